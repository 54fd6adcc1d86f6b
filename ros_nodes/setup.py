"""ament_python build of ros_nodes as the ROS 2 package vla_prune_ros (colcon build).

Only for workspaces with a full ROS 2 install: this directory is the package root
(package.xml, resource/, launch/) and the Python package ``ros_nodes`` itself. Elsewhere,
ros_nodes installs with vla-prune (pyproject.toml at the repository root).
"""

from glob import glob

from setuptools import setup

PACKAGE = "vla_prune_ros"

setup(
    name=PACKAGE,
    version="0.1.0",
    packages=["ros_nodes"],
    package_dir={"ros_nodes": "."},
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/launch", glob("launch/*.launch.py")),
        (f"share/{PACKAGE}/config", glob("../configs/ros/*.yaml")),
    ],
    install_requires=["setuptools"],
    zip_safe=True,
    entry_points={
        "console_scripts": [
            "policy_node = ros_nodes.policy_node:main",
            "sim_bridge = ros_nodes.sim_bridge:main",
        ],
    },
)

"""Launch the VLA policy node (a lifecycle node) and, optionally, the sim bridge.

For robots with a full ROS 2 install (launch / launch_ros are not on PyPI; on machines without
them use ``vla-prune ros-node`` / ``python -m ros_nodes.launcher``, which run the same
executables with the same parameter file)::

    ros2 launch vla_prune_ros policy.launch.py
    ros2 launch vla_prune_ros policy.launch.py params_file:=/path/to/params.yaml \\
        with_bridge:=true autostart:=false

With ``autostart:=false`` the policy node waits unconfigured for a lifecycle manager
(``ros2 lifecycle set /vla_policy configure`` then ``activate``).
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import LifecycleNode, Node
from launch_ros.parameter_descriptions import ParameterValue

PACKAGE = "vla_prune_ros"


def generate_launch_description():
    default_params = os.path.join(
        get_package_share_directory(PACKAGE), "config", "policy_node.yaml"
    )
    params = LaunchConfiguration("params_file")
    log_level = LaunchConfiguration("log_level")
    return LaunchDescription([
        DeclareLaunchArgument(
            "params_file", default_value=default_params,
            description="parameter YAML for vla_policy and vla_sim_bridge",
        ),
        DeclareLaunchArgument(
            "with_bridge", default_value="false",
            description="also start the simulated robot (sim_bridge)",
        ),
        DeclareLaunchArgument(
            "autostart", default_value="true",
            description="the policy node configures and activates itself",
        ),
        DeclareLaunchArgument("log_level", default_value="info"),
        LifecycleNode(
            package=PACKAGE,
            executable="policy_node",
            name="vla_policy",
            namespace="",
            output="screen",
            parameters=[
                params,
                {"autostart": ParameterValue(LaunchConfiguration("autostart"), value_type=bool)},
            ],
            ros_arguments=["--log-level", log_level],
        ),
        Node(
            package=PACKAGE,
            executable="sim_bridge",
            name="vla_sim_bridge",
            output="screen",
            parameters=[params],
            ros_arguments=["--log-level", log_level],
            condition=IfCondition(LaunchConfiguration("with_bridge")),
        ),
    ])

"""`vla-prune ros-node`: the policy node and the sim bridge from one parameter file."""

from __future__ import annotations

import sys


def cmd_ros_node(args) -> int:
    """The ROS 2 policy node and the sim bridge as separate processes (ros_nodes.launcher)."""
    from ros_nodes import launcher

    try:
        import rclpy  # noqa: F401
    except ImportError as e:
        print(
            f'vla-prune ros-node needs the ROS 2 extra: pip install -e ".[ros,sim]" ({e})',
            file=sys.stderr,
        )
        return 2
    return launcher.run_args(args)

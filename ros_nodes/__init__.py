"""ROS 2 nodes: the VLA policy as a lifecycle node with a latency budget, and a sim bridge.

Needs the ``ros`` extra (rclpy and message wheels). Modules without ROS imports:
``params`` (node parameters), ``inputs`` (message validation), ``diagnostics`` (counters),
``policy_runtime`` (model + latency controller).
"""

"""The `vla-prune` command line: an application over the library (vla_prune), the simulation
package (sim) and the ROS 2 nodes (ros_nodes). It lives outside vla_prune so that the library
never imports its own applications."""

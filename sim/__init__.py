"""Simulation: environments, scripted experts and demonstration datasets (no torch needed)."""

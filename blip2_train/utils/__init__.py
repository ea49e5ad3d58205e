"""Helpers every layer may use: hub reachability (hub.py). Imports nothing else of the package."""

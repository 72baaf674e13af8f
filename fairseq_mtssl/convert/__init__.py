"""Checkpoint conversion in and out of the plugin's models."""

"""Evaluation of frozen speech representations."""

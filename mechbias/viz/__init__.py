"""Figures (matplotlib): every function takes a result and returns a figure."""

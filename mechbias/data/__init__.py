"""Data layer: contexts, demographic axes, prompt sets and splits, neutral text."""

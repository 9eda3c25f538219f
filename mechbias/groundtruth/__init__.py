"""Ground truth: a planted-bias model whose truth is known, and scores of every method against it.

This layer sits above the methods (it scores them) and below the apps.
"""

"""Core layer: models, sites (hook names), hooks, the batched runner, result I/O.

Nothing here imports another layer of mechbias.
"""

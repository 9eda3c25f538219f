"""Evaluation layer: bias metrics, statistics, the transfer engine, external benchmarks."""

"""Interventions layer: value objects that change a model reversibly and own their random controls."""

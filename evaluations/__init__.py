"""Sweeps, metrics, plots, reports and the ``pfedpg-eval`` CLI. Imports every other package."""

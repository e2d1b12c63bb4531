"""Benchmarks: one shared measurement library (`benchmarks.lib`) and one module per benchmark."""

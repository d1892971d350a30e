"""Demos and benchmarks: ``panal demo`` and ``panal bench chaos|device|dispatch``."""

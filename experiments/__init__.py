"""Experiment tooling: the comparison (compare, its report, plots, statistics), the inner-loop
search, benchmarks/ and results/ (tables and run records)."""

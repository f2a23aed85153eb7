"""Benchmarks behind `lt-distill bench ...`: each returns a dict of figures and prints a table."""

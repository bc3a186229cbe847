"""Benchmarks and the workloads they replay: `perpx bench matcher|lobster|e2e|durability|risk`."""

"""Helpers shared by the benchmarks in `bench/`: synthetic checkpoints, peer tools, process measurement."""

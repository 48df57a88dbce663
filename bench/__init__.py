"""Benchmarks (see README "Performance"); run them with bench/run."""

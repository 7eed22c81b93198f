"""Reference implementations that tests and benchmarks share: the plain, slow way, for comparison."""

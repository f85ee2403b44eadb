"""Scripts and configs on top of `mot` and `moe`: training, data, ablations, benchmarks."""

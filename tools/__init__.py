"""Command-line tools: benchmarks, dataset generation and statistics, ablations, image search."""

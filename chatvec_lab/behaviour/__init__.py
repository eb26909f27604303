"""What a model does: generation, scorers, the grid engine and its cache, sweeps, the atlas, ablations."""

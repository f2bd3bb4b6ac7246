"""Data: frame sources (the embedded synthetic benchmark, DeepfakeBench indexes), transforms and loaders."""

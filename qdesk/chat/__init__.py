"""Chat with models: the engine's worker processes, side-by-side comparison, saved conversations."""

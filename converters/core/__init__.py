"""Primitives every stage shares: errors, progress and cancel, atomic outputs, the GGUF header check."""

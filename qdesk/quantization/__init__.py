"""Quantizing from the app: several variants in one queue, size and fit previews."""

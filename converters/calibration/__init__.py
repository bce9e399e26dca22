"""Calibration: text, the importance matrix and its file formats, per-token divergence."""

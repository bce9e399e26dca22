"""Rotary-embedding tables that llama.cpp reads from the file instead of computing."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np


def llama3_rope_frequencies(head_dim: int, theta: float, scaling: Mapping[str, Any]) -> np.ndarray:
    """Per-frequency divisors for Llama 3.1-style rope scaling (the `rope_freqs` tensor).

    Long wavelengths are divided by `factor`, short ones are kept, and the band between is blended.
    """
    factor = float(scaling.get("factor", 8.0))
    low_freq_factor = float(scaling.get("low_freq_factor", 1.0))
    high_freq_factor = float(scaling.get("high_freq_factor", 4.0))
    original_context = float(scaling.get("original_max_position_embeddings", 8192))

    inverse_frequencies = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelengths = 2 * math.pi / inverse_frequencies
    low_freq_wavelength = original_context / low_freq_factor
    high_freq_wavelength = original_context / high_freq_factor

    smooth = (original_context / wavelengths - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = 1.0 / ((1 - smooth) / factor + smooth)
    divisors = np.where(
        wavelengths < high_freq_wavelength,
        1.0,
        np.where(wavelengths > low_freq_wavelength, factor, blended),
    )
    return divisors.astype(np.float32)

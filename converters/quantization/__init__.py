"""Quantization: llama.cpp's presets, per-tensor plans, the quantize job."""

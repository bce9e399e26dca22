"""The bridge to llama.cpp's compiled libraries shipped by llama-cpp-python 0.3.36.

- `native.ggml`: checked ctypes declarations of libggml (tensor layout, type traits, quantize kernels,
  backend registry).
- `native.backends`: backends, devices and their memory, CPU SIMD features.
- `native.activations`: evaluation of any GGUF llama.cpp runs, collecting importance-matrix statistics.
- `native.kernels`: quantize/dequantize/error of tensors at candidate types through ggml's own encoders.
- `native.quantizer`: llama.cpp's quantizer in a child process (cancel, crash isolation, per-tensor report).

It imports llama-cpp-python and numpy, never `converters` or `qdesk`.
"""

"""The bridge to llama.cpp's compiled libraries shipped by llama-cpp-python (backend discovery, activation
statistics, the quantizer call, fast kernels). It arrives with the native-bridge issue; nothing here yet."""

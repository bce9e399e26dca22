"""Writing GGUF: the conversion, the streaming writer, the output tensor types."""

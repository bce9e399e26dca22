"""Hugging Face checkpoints in, GGUF files out: reading, architecture tables, tokenizers, writing."""

"""Reading Hugging Face checkpoints: config, safetensors and .bin files, architectures, tokenizers."""

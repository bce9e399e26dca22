"""Models larger than one machine: llama.cpp's RPC workers (`qdesk worker`) and where a model's layers land."""

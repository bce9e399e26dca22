"""qdesk: convert, quantize, measure and chat with local LLMs as GGUF files."""

__version__ = "0.1.0"

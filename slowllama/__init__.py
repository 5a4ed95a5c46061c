"""slowllama: fine-tune Llama-family models far larger than memory, streamed block by block from SSD."""

__version__ = "0.1.0"

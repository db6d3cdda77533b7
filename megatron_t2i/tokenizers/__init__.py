"""Text tokenizers (sentencepiece) and image tokenizers (VQ)."""

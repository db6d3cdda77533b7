"""Contrastive alignment of image-code embeddings with a pretrained LM's text embeddings."""

"""Evaluation: perplexity per modality, forgetting of text skills, image generation, FID and
the demo's caption fidelity. Every tool under tools/ loads its model through loading.py."""

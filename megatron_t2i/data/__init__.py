"""Token files, datasets, samplers and the embedded demo corpus."""

"""della: merge fine-tuned language models without training (DELLA-Merging, arXiv 2406.11617)."""

__version__ = "0.1.0"

"""Stage one of Saliency Prompt: images in, saliency pseudo-masks and seed embeddings out."""

__version__ = "0.1.0"

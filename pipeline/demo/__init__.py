"""The embedded demo dataset: seeded rendering of shape-defined classes over textures and
subject-free backgrounds, its COCO files and its preview (``python -m pipeline data``)."""

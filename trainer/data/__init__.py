"""Data for training and evaluation: augmentation, shard and COCO datasets, the resumable loader,
low-data splits, up-front checks of labelled sets, and the frozen-feature cache."""

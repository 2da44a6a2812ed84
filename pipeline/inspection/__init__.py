"""Looking at shards: the ``inspect`` command, summaries, overlays, COCO export and recall against
ground truth."""

"""Stage one's algorithm: seeds, similarity maps, maskness, Matrix NMS and filters as batched
tensor functions (docs/method.md, stage one), the optional mask clean-up, and mask statistics."""

"""Stages two and three of Saliency Prompt: K-Net pre-training from shards, then fine-tuning."""

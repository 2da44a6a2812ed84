"""Stages two and three of Saliency Prompt: K-Net pre-training from shards, then fine-tuning; and
using a trained model: ``from trainer import Predictor``."""

from typing import Any


def __getattr__(name: str) -> Any:
    # Lazy, so importing a trainer module does not pull in the model code.
    if name == "Predictor":
        from trainer.inference.predictor import Predictor

        return Predictor
    raise AttributeError(f"module 'trainer' has no attribute {name!r}")

"""The method's stages as commands: ``pretrain`` (with its pretext fit), ``finetune`` (with its
periodic evaluation), ``evaluate``, and a self-training round (``pseudo-label``)."""

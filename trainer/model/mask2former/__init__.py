"""Mask2Former in plain PyTorch: deformable pixel decoder, masked-attention decoder, criterion."""

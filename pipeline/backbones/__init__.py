"""Frozen self-supervised backbones (DINOv2 ViT-S/14, ResNet-50) and loading their weights from
the checkpoint layouts researchers have (DINOv2, DenseCL, MoCo, torchvision, the demo ONNX)."""

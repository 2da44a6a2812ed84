"""K-Net in plain PyTorch: pyramid (ViT) or FPN (ResNet), semantic fusion, kernel head, update stages."""

"""K-Net in plain PyTorch: pyramid or FPN, semantic fusion, kernel head, update stages."""

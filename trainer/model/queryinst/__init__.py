"""QueryInst in plain PyTorch: proposal queries, dynamic instance interaction, dynamic mask head."""

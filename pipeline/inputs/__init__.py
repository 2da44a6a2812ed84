"""What comes in: listing and decoding images with bounded cost, and validating COCO files before
pycocotools sees them."""

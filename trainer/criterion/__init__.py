"""What the models are trained against: Hungarian matching, the mask and class losses, point
sampling, DropLoss, and Saliency Prompt's prompts and kernel supervision."""

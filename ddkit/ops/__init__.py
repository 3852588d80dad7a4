"""Pure tensor functions in the style of torchvision.ops."""

"""blip2_train: config-driven BLIP-2 training on PyTorch Lightning."""

__version__ = "0.1.0"

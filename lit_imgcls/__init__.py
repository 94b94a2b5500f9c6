"""lit-imgcls: image classification experiments on PyTorch Lightning, configured by YAML."""

__version__ = "0.1.0"

"""The architectures: the variant table (``variants``), the NNX ResNet (``resnet``), pure and
compiled forms of a model (``functional``), BatchNorm folding (``folding``) and the fused
inference blocks (``fused``)."""

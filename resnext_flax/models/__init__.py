"""The architectures: the variant table (``variants``), the NNX ResNet (``resnet``), pure and
compiled forms of a model (``functional``) and BatchNorm folding (``folding``)."""

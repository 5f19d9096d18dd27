"""Foreign checkpoints: files written by other projects' training code. ``names`` renames
their keys to torchvision's, ``survey`` finds every ResNet trunk in a file (containers,
prefixes), ``resolve`` picks the one to load by the options, and ``report`` says what was
found, taken and dropped (``resnext-flax inspect``)."""

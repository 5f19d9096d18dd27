"""Weights, as a pipeline: read a file (``files``) -> map torch names and layouts onto the
model (``torch_port``) -> build and fill the model and attach what it was loaded with
(``loading``). Converted checkpoints (``checkpoint``), the catalog of published weight sets
(``catalog``), the download cache (``cache``), pretrained models (``pretrained``) and verified
conversion (``conversion``) build on it. Files written by other projects' code (containers,
prefixes, other key names) are resolved to one torchvision-named trunk in ``foreign``."""

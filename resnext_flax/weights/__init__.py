"""Weights: the torch port (``torch_port``), reading files (``files``), torchvision's and other
projects' key names (``names``) and what a file holds (``resolve``), loading them into models
(``loading``), converted checkpoints (``checkpoint``), the catalog of published weight sets
(``catalog``), the download cache (``cache``), pretrained models (``pretrained``) and verified
conversion (``conversion``)."""

"""Building blocks: convolution lowerings and pooling (``ops``, ``winograd``) and the layers
with torch's semantics (``layers``)."""

"""Building blocks: the layers with torch's semantics (``layers``), plain-XLA convolution and
pooling (``ops``), the conv policy (``policy``) and, optional, the CPU lowerings
(``lowering``)."""

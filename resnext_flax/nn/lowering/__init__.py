"""The CPU lowerings of a convolution: pure-XLA rewrites (``xla``, ``winograd``), the compiled
kernel (``kernel``) and the dispatch between them (``conv``).

Optional by design: only ``nn.layers.Conv`` imports it, lazily, when a conv runs on the CPU
under a policy that may use it. Programs for GPU/TPU, or under ``ConvPolicy(lowering="xla")``,
never import it, so they carry none of its custom calls.
"""

"""Which lowering computes each convolution: :class:`ConvPolicy`, one immutable value.

A policy is a static attribute of every ``Conv`` (it lives in the NNX graph definition), so a
jitted function of a split model is traced again for another policy and never reuses a program
traced under a different one. Nothing global decides what a trace contains.

On GPU/TPU every conv is XLA's own (cuDNN and TPU convs are fast). On the CPU, XLA's grouped
convs are slow and its matmuls beat its convs, so the automatic choice rewrites the shapes
where another form is faster; ``docs/performance.md`` has the measurements behind the order
below. Every lowering computes the same sum; only the float rounding order differs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp

#: The lowerings a policy can name; "auto" picks one per conv by backend and shape.
LOWERINGS = ("auto", "xla", "matmul", "shifted_taps", "group_chunks", "winograd", "ffi")

#: Lowerings used only when a conv is evaluated; derivatives take the direct conv instead,
#: so training computes the gradients of the plain convolution.
FAST_LOWERINGS = ("winograd", "ffi")

# Largest channels-per-group for which the elementwise "shifted taps" form beats XLA's grouped
# conv on the CPU (its fused loop's work grows as d^2 per output).
_MAX_TAPS_GROUP_WIDTH = 8

# XLA's CPU grouped conv slows down far more than linearly with the group count, so wider
# grouped convs run as several grouped convs of this many groups each.
GROUPS_PER_CHUNK = 8


@dataclasses.dataclass(frozen=True)
class ConvPolicy:
    """How convolutions are lowered; hashable, so it can key a jit cache.

    **Arguments:**
    - `lowering`: "auto" (per shape and backend, the default) or one of ``LOWERINGS`` for every
      conv on the CPU (a conv the named form cannot express runs as XLA's own). "xla" gives a
      pure-XLA program with no custom call, on any backend.
    - `exclude`: lowerings the automatic choice skips (it takes the next preference).
    - `fuse`: at inference (``optimize_for_inference``), apply bias, residual and ReLU in the
      compiled kernel's GEMM where it runs a 1x1 conv, and keep each residual block's output in
      memory once (a fusion boundary). Off: the same ops, in XLA.
    - `gemm_1x1`: dense 1x1 convs in the compiled kernel's GEMM (else XLA's matmul).
    - `direct_strided`: dense strided 3x3 convs in the compiled kernel (else XLA's conv).
    - `direct_max_pixels`: dense 3x3 stride-1 convs in the compiled kernel up to this many
      output pixels (batch included; larger maps go to Winograd); 0: none, None: all.
    - `stem`: dense convs over a few input channels (the 7x7 stem conv over RGB) in the
      compiled kernel's stem form, and the max-pool after the stem in the kernel (else XLA's
      conv and ``reduce_window``).
    """

    lowering: str = "auto"
    exclude: frozenset[str] = frozenset()
    fuse: bool = True
    gemm_1x1: bool = True
    direct_strided: bool = True
    direct_max_pixels: int | None = 196
    stem: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.exclude, str) or not isinstance(self.exclude, Iterable):
            raise TypeError(f"exclude must be a collection of lowering names, got "
                            f"{self.exclude!r}")
        object.__setattr__(self, "exclude", frozenset(self.exclude))
        for name in (self.lowering, *sorted(self.exclude)):
            if name not in LOWERINGS:
                raise ValueError(f"unknown conv lowering {name!r}; expected one of {LOWERINGS}")
        if {"auto", "xla"} & self.exclude:
            raise ValueError("'auto' and 'xla' cannot be excluded: XLA's own conv is what every "
                             "other lowering falls back to")
        if self.lowering in self.exclude:
            raise ValueError(f"lowering {self.lowering!r} is both chosen and excluded")
        for name in ("fuse", "gemm_1x1", "direct_strided", "stem"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        pixels = self.direct_max_pixels
        if pixels is not None and (isinstance(pixels, bool) or not isinstance(pixels, int)
                                   or pixels < 0):
            raise ValueError(f"direct_max_pixels must be an int >= 0 or None, got {pixels!r}")

    def replace(self, **changes) -> ConvPolicy:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def without(self, *names: str) -> ConvPolicy:
        """The automatic choice of this policy with `names` excluded as well."""
        return self.replace(lowering="auto", exclude=self.exclude | set(names))

    @property
    def uses_kernels(self) -> bool:
        """Whether the compiled CPU kernel may run under this policy (where it loaded)."""
        return self.lowering in ("auto", "ffi") and "ffi" not in self.exclude

    def select(self, kernel_shape: tuple[int, ...], *, groups: int = 1, stride: int = 1,
               backend: str | None = None) -> str:
        """The lowering for a kernel (HWIO) before the input is known: the first preference.
        "ffi" here may still give way to the next choice for some inputs (:meth:`choose`)."""
        if (backend or jax.default_backend()) != "cpu":
            return "xla"
        if self.lowering != "auto":
            return self.lowering
        return next((name for name in self._cpu_preferences(kernel_shape, groups, stride)
                     if name not in self.exclude), "xla")

    def choose(self, x_shape: tuple[int, ...], kernel_shape: tuple[int, ...], *, stride: int = 1,
               padding: int = 0, groups: int = 1, dtype=jnp.float32,
               backend: str | None = None) -> str:
        """The lowering that computes this conv (NHWC input, HWIO kernel)."""
        if (backend or jax.default_backend()) != "cpu":
            return "xla"
        if self.lowering == "ffi":
            if self._kernel_takes(x_shape, kernel_shape, stride, padding, groups, dtype):
                return "ffi"
            return self.without("ffi").choose(x_shape, kernel_shape, stride=stride,
                                              padding=padding, groups=groups, dtype=dtype,
                                              backend="cpu")
        if self.lowering != "auto":
            return self.lowering
        for name in self._cpu_preferences(kernel_shape, groups, stride):
            if name in self.exclude:
                continue
            if name != "ffi" or self._kernel_takes(x_shape, kernel_shape, stride, padding,
                                                   groups, dtype):
                return name
        return "xla"

    def _cpu_preferences(self, kernel_shape: tuple[int, ...], groups: int,
                         stride: int) -> list[str]:
        """The CPU lowerings for a kernel, best first."""
        kh, kw, per_group, _ = kernel_shape
        ffi = ["ffi"] if self._may_use_kernel(kernel_shape, groups, stride) else []
        if groups > 1:
            if per_group <= _MAX_TAPS_GROUP_WIDTH:
                return [*ffi, "shifted_taps"]
            winograd = ["winograd"] if kh == kw == 3 and stride == 1 else []
            return ffi + winograd + (["group_chunks"] if groups > GROUPS_PER_CHUNK else [])
        if kh == kw == 1:
            return [*ffi, "matmul"]
        if kh == kw == 3:
            return ffi + (["winograd"] if stride == 1 else [])
        return ffi

    def _may_use_kernel(self, kernel_shape: tuple[int, ...], groups: int, stride: int) -> bool:
        """Whether the compiled kernel is a candidate for a kernel shape: it loaded, and for a
        dense conv the rule knobs leave it some inputs."""
        kh, kw = kernel_shape[:2]
        if _stem_shaped(kernel_shape, groups):
            wanted = self.stem
        elif groups > 1:
            wanted = kh == kw == 3
        elif kh == kw == 1:
            wanted = self.gemm_1x1
        elif kh == kw == 3:
            wanted = self.direct_strided if stride != 1 else self.direct_max_pixels != 0
        else:
            wanted = False
        return wanted and _kernel_loaded()

    def _kernel_takes(self, x_shape: tuple[int, ...], kernel_shape: tuple[int, ...],
                      stride: int, padding: int, groups: int, dtype) -> bool:
        """Whether the compiled kernel runs this conv: it can, and for a dense conv the rule
        says it beats the pure-XLA choice (1x1 convs as a GEMM, strided 3x3 convs, stride-1
        3x3 convs on small maps, where Winograd's fewer multiplies do not pay)."""
        if not self._may_use_kernel(kernel_shape, groups, stride):
            return False
        from resnext_flax.nn.lowering import kernel, stem

        if _stem_shaped(kernel_shape, groups):
            return stem.supports(x_shape, kernel_shape, stride, padding, groups, dtype)
        if not kernel.supports(x_shape, kernel_shape, stride, padding, groups, dtype):
            return False
        if groups > 1 or kernel_shape[:2] == (1, 1) or stride != 1:
            return True
        pixels = math.prod(kernel.output_size(x_shape, kernel_shape, stride, padding))
        return self.direct_max_pixels is None or pixels <= self.direct_max_pixels

    def pool_kernel(self, x_shape: tuple[int, ...], dtype, *, window: int, stride: int,
                    padding: int, backend: str | None = None) -> Callable | None:
        """The compiled kernel's max-pool (``nn.lowering.stem.max_pool``, the same values as
        ``ops.max_pool``) where the max-pool after a stem conv of this policy runs in it: on
        the CPU, where the kernel may run and `stem` is on, for an input it takes; else None."""
        if (backend or jax.default_backend()) != "cpu" or not (self.uses_kernels and self.stem):
            return None
        if not _kernel_loaded():
            return None
        from resnext_flax.nn.lowering import stem

        if not stem.pool_supports(x_shape, dtype, window=window, stride=stride, padding=padding):
            return None
        return stem.max_pool


#: The automatic choice (the default of every ``Conv``).
DEFAULT_POLICY = ConvPolicy()
#: XLA's own convolution everywhere: a program without the library's custom calls (export).
XLA_POLICY = ConvPolicy(lowering="xla")


def _stem_shaped(kernel_shape: tuple[int, ...], groups: int) -> bool:
    """A kernel for the compiled kernel's stem form (which loaded)."""
    from resnext_flax.nn.lowering import kernel

    return kernel.stem_shaped(tuple(kernel_shape), groups) and kernel.available()


def _kernel_loaded() -> bool:
    from resnext_flax.nn.lowering import kernel

    return kernel.available()

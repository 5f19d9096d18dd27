"""``nn.heap``: freed large blocks stay in glibc's heap, so the next call's buffers take no
page faults; ``optimize_for_inference`` turns it on, an environment variable leaves it off.
Each case runs in a child process (malloc settings are process-wide)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from limits import CHILD_TIMEOUT

from resnext_flax.nn import heap

pytestmark = pytest.mark.skipif(heap._glibc() is None, reason="needs Linux with glibc")

FAULTS = textwrap.dedent("""
    import ctypes
    import resource
    import numpy as np

    # No transparent huge pages, so that a fresh buffer takes one fault per 4 KiB page.
    PR_SET_THP_DISABLE = 41
    assert ctypes.CDLL(None).prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0) == 0

    def faults_of_a_fresh_buffer():
        # 64 MiB, above glibc's largest mmap threshold: a fresh mapping by default.
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        buffer = np.empty(64 << 20, np.uint8)
        buffer[::4096] = 1
        del buffer
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
""")


def _child(code: str, **env: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", FAULTS + textwrap.dedent(code)],
                         capture_output=True, text=True, timeout=CHILD_TIMEOUT,
                         env={**os.environ, "JAX_PLATFORMS": "cpu", **env})
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


PAGES = (64 << 20) // 4096


def test_freed_blocks_are_reused_without_page_faults():
    default, applied, kept = _child("""
        from resnext_flax.nn import heap
        faults_of_a_fresh_buffer()
        default = faults_of_a_fresh_buffer()
        applied = heap.keep_freed_memory()
        faults_of_a_fresh_buffer()  # the heap grows once
        print(default, applied, faults_of_a_fresh_buffer())
    """)
    assert int(default) > PAGES // 2  # glibc's default: a fresh mapping each time
    assert applied == "True"
    assert int(kept) < PAGES // 100


def test_env_leaves_glibc_defaults():
    default, applied, again = _child("""
        from resnext_flax.nn import heap
        faults_of_a_fresh_buffer()
        default = faults_of_a_fresh_buffer()
        applied = heap.keep_freed_memory()
        faults_of_a_fresh_buffer()
        print(default, applied, faults_of_a_fresh_buffer())
    """, RESNEXT_FLAX_MALLOC_DEFAULTS="1")
    assert applied == "False"
    assert int(again) > PAGES // 2 and int(default) > PAGES // 2


def test_optimize_for_inference_keeps_freed_memory_on_the_cpu():
    (reused,) = _child("""
        from flax import nnx
        from resnext_flax import create_model
        from resnext_flax.models.folding import optimize_for_inference
        optimize_for_inference(create_model("resnet18", rngs=nnx.Rngs(0)))
        faults_of_a_fresh_buffer()
        print(faults_of_a_fresh_buffer() < (64 << 20) // 4096 // 100)
    """)
    assert reused == "True"


def test_a_pure_xla_preparation_leaves_glibc_defaults():
    """Export prepares its model under XLA_POLICY (no compiled kernel): the process's malloc
    settings stay as they were."""
    (fresh,) = _child("""
        from flax import nnx
        from resnext_flax import create_model
        from resnext_flax.models.folding import optimize_for_inference
        from resnext_flax.nn.policy import XLA_POLICY
        optimize_for_inference(create_model("resnet18", rngs=nnx.Rngs(0)), policy=XLA_POLICY)
        faults_of_a_fresh_buffer()
        print(faults_of_a_fresh_buffer() > (64 << 20) // 4096 // 2)
    """)
    assert fresh == "True"

"""JAX's persistent compilation cache (``resnext_flax.compilation``): programs with the compiled
CPU kernel's custom calls are kept and reloaded by a second process, which compiles nothing and
computes the same bits; the library never changes JAX's settings on its own; the command line
uses the cache and says what it compiles."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from resnext_flax import cli, compilation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Counts what JAX reports, independently of the library: every backend compilation (also
# reported when the executable comes from the persistent cache) and every cache hit.
COUNTING = """
from jax import monitoring
counts = {"backend": 0, "hits": 0}
def _span(event, start, end, **kw):
    counts["backend"] += event == "/jax/core/compile/backend_compile_duration"
def _event(event, **kw):
    counts["hits"] += event == "/jax/compilation_cache/cache_hits"
monitoring.register_event_time_span_listener(_span)
monitoring.register_event_listener(_event)
"""

FORWARD = COUNTING + """
import sys, json
import numpy as np
import jax
import resnext_flax
from resnext_flax.compilation import report_compilation
from resnext_flax.nn.lowering import kernel
from resnext_flax.nn.policy import ConvPolicy

resnext_flax.enable_compilation_cache(sys.argv[1])
model = resnext_flax.resnet18(num_classes=10)
fast = resnext_flax.optimize_for_inference(model)
x = np.random.default_rng(0).standard_normal((2, 64, 64, 3)).astype(np.float32)
text = jax.jit(lambda m, v: m(v)).lower(fast, x).as_text()  # lowered, not compiled
with report_compilation("resnet18 for 2x64x64", enabled=False) as report:
    out = np.asarray(fast(x))
np.save(sys.argv[2], out)
print(json.dumps({
    "real_compiles": counts["backend"] - counts["hits"], "hits": counts["hits"],
    "kernel": kernel.available() and ConvPolicy().uses_kernels,
    "custom_calls": [t for t in kernel.TARGETS if t in text],
    "report": [report.compiled, report.loaded]}))
"""


def _run(code: str, *args: str, env: dict[str, str] | None = None) -> str:
    environment = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
    environment.pop("JAX_COMPILATION_CACHE_DIR", None)
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True,
                            text=True, env=environment, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def test_a_second_process_compiles_nothing_and_computes_the_same_bits(tmp_path):
    cache = tmp_path / "cache"
    first = json.loads(_run(FORWARD, str(cache), str(tmp_path / "first.npy")))
    entries = sorted(os.listdir(cache))
    assert first["real_compiles"] > 0 and first["hits"] == 0, first
    assert len(entries) == first["real_compiles"], entries  # every program kept
    second = json.loads(_run(FORWARD, str(cache), str(tmp_path / "second.npy")))
    assert second["real_compiles"] == 0, second  # everything came from the cache
    assert second["hits"] == first["real_compiles"], (first, second)
    assert sorted(os.listdir(cache)) == entries  # nothing new written
    (compiled, loaded), again = first["report"], second["report"]
    assert compiled >= 1 and loaded == 0 and again == [0, compiled], (first, second)
    a, b = np.load(tmp_path / "first.npy"), np.load(tmp_path / "second.npy")
    assert a.shape == (2, 10) and np.isfinite(a).all()
    assert a.tobytes() == b.tobytes()
    if not first["kernel"]:
        # Every cache assertion above has run; only the custom-call check needs the kernel,
        # which a machine without a C++ compiler or AVX2 does not build (CI builds it).
        pytest.skip("the compiled CPU kernel is unavailable here: the cache was checked on a "
                    "program without its custom calls")
    assert first["custom_calls"], "the optimized program holds none of the kernel's calls"


SETTINGS = ("jax_compilation_cache_dir", "jax_enable_compilation_cache",
            "jax_persistent_cache_min_compile_time_secs",
            "jax_persistent_cache_min_entry_size_bytes")


def test_importing_and_using_the_library_leaves_jax_settings_alone():
    code = textwrap.dedent(f"""
        import json
        import jax
        import numpy as np
        from jax._src import compilation_cache
        names = {SETTINGS!r}
        before = [getattr(jax.config, n) for n in names]
        import resnext_flax
        from resnext_flax import compilation, cli
        model = resnext_flax.create_model("resnet18", num_classes=3)
        model.eval()
        model(np.zeros((1, 32, 32, 3), np.float32))
        after = [getattr(jax.config, n) for n in names]
        print(json.dumps([before == after, compilation_cache._cache is None]))
    """)
    assert json.loads(_run(code)) == [True, True]


def test_enable_works_after_a_first_compile_is_idempotent_and_switches_folders(tmp_path):
    code = textwrap.dedent("""
        import json, os, sys
        import jax, jax.numpy as jnp
        from jax._src import compilation_cache as cc
        from resnext_flax import enable_compilation_cache
        from resnext_flax.compilation import compilation_cache
        a, b, c = sys.argv[1:]
        jax.jit(lambda x: x + 1)(jnp.ones(3))  # compiled before any cache is set
        first = enable_compilation_cache(a)
        jax.jit(lambda x: x * 3)(jnp.ones(3))
        opened = cc._cache
        again = enable_compilation_cache(a)
        same = cc._cache is opened  # nothing reset
        enable_compilation_cache(b)
        jax.jit(lambda x: x * 5)(jnp.ones(3))
        with compilation_cache(c) as inside:
            jax.jit(lambda x: x * 7)(jnp.ones(3))
        restored = jax.config.jax_compilation_cache_dir
        jax.jit(lambda x: x * 9)(jnp.ones(3))
        print(json.dumps([str(first), str(again), same, str(inside), restored,
                          [len(os.listdir(d)) for d in (a, b, c)],
                          jax.config.jax_persistent_cache_min_compile_time_secs]))
    """)
    a, b, c = (str(tmp_path / name) for name in "abc")
    first, again, same, inside, restored, counts, min_time = json.loads(_run(code, a, b, c))
    assert first == again == a and inside == c and restored == b and same
    assert counts == [1, 2, 1]  # each folder got what was compiled while it was set
    assert min_time == 0


def test_enable_refuses_a_file(tmp_path):
    path = tmp_path / "file"
    path.write_text("")
    with pytest.raises(NotADirectoryError, match=r"compilation cache folder .* is a file"):
        compilation.enable_compilation_cache(path)


def test_the_default_folder_is_under_the_library_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("RESNEXT_FLAX_CACHE", str(tmp_path))
    assert compilation.default_compilation_cache_dir() == tmp_path / "jax-compilation"
    monkeypatch.setenv(compilation.ENV, "0")
    assert compilation.command_line_cache_dir() is None
    monkeypatch.setenv(compilation.ENV, str(tmp_path / "elsewhere"))
    assert compilation.command_line_cache_dir() == tmp_path / "elsewhere"
    monkeypatch.setenv(compilation.ENV, "1")
    assert compilation.command_line_cache_dir() == tmp_path / "jax-compilation"


def _cli_args(**options) -> argparse.Namespace:
    return argparse.Namespace(**{"compiles": True, "no_compilation_cache": False, **options})


def test_the_command_line_cache_is_switchable_and_restores_jax_settings(monkeypatch, tmp_path):
    monkeypatch.setenv(compilation.ENV, str(tmp_path / "c"))
    before = [getattr(jax.config, n) for n in SETTINGS]
    with cli.common.compilation_cache_for(_cli_args()):
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "c")
    assert [getattr(jax.config, n) for n in SETTINGS] == before
    for args, env in ((_cli_args(no_compilation_cache=True), str(tmp_path / "c")),
                      (_cli_args(), "0"), (argparse.Namespace(), str(tmp_path / "c"))):
        monkeypatch.setenv(compilation.ENV, env)
        with cli.common.compilation_cache_for(args):
            assert [getattr(jax.config, n) for n in SETTINGS] == before
    parsed = cli.parser().parse_args(["predict", "x.jpg", "--model", "resnet18",
                                      "--no-compilation-cache"])
    assert parsed.compiles and parsed.no_compilation_cache
    for command in (["evaluate", "DIR", "--model", "resnet18"], ["convert", "IN", "-o", "OUT"],
                    ["finetune", "DIR", "--model", "resnet18"]):
        assert cli.parser().parse_args(command).compiles
    assert not hasattr(cli.parser().parse_args(["list"]), "compiles")


def test_an_unusable_cache_folder_is_reported_and_the_command_runs(monkeypatch, tmp_path,
                                                                   capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv(compilation.ENV, str(blocker))
    with cli.common.compilation_cache_for(_cli_args()):
        assert jax.config.jax_compilation_cache_dir != str(blocker)
    assert "warning: compilation cache off: the compilation cache folder" in capsys.readouterr(
        ).err


def test_report_compilation_says_compiled_loaded_or_nothing(tmp_path, capsys):
    def fresh():  # a new jitted function: traced and compiled (or loaded) again
        return jax.jit(lambda x: x * 2 + 1)

    x = np.ones(4, np.float32)
    with compilation.compilation_cache(tmp_path):
        with compilation.report_compilation("f for 4") as report:
            fresh()(x)
        err = capsys.readouterr().err.splitlines()
        assert err[0] == "resnext-flax: compiling f for 4, or loading it from the compilation " \
                         "cache..."
        assert err[1].startswith("resnext-flax: compiled f for 4 in ")
        assert err[1].endswith(f"s (1 program; kept in {tmp_path} for next time)")
        assert (report.compiled, report.loaded) == (1, 0) and report.seconds > 0
        with compilation.report_compilation("f for 4") as report:
            fresh()(x)
        err = capsys.readouterr().err.splitlines()
        assert err[1].startswith("resnext-flax: f for 4 loaded from the compilation cache in ")
        assert (report.compiled, report.loaded) == (0, 1)
        with compilation.report_compilation("f for 4", enabled=False) as report:
            fresh()(x)
        assert capsys.readouterr().err == "" and report.loaded == 1
    compiled = jax.jit(lambda x: x * 3)
    compiled(x)
    with compilation.report_compilation("g for 4") as report:
        compiled(x)  # already compiled in memory: nothing to say
    assert capsys.readouterr().err == "" and (report.compiled, report.loaded) == (0, 0)
    if jax.config.jax_compilation_cache_dir is None:
        with compilation.report_compilation("h for 4"):
            jax.jit(lambda x: x * 4)(x)
        err = capsys.readouterr().err.splitlines()
        assert err[0] == "resnext-flax: compiling h for 4 (the compilation cache is off)..."
        assert err[1].endswith("(1 program; the compilation cache is off: the next run "
                               "compiles again)")


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
    import torch_reference
    from pretrained_helpers import save_torchvision_file

    model = torch_reference.torch_model("resnet18", seed=3)
    return save_torchvision_file(model, tmp_path_factory.mktemp("w"), "resnet18")


def test_predict_says_what_it_compiles_and_loads_it_the_second_time(resnet18_file, tmp_path,
                                                                    monkeypatch, capsys):
    from pretrained_helpers import sample_image_paths

    monkeypatch.setenv(compilation.ENV, str(tmp_path / "cache"))
    command = ["predict", sample_image_paths()[0], "--model", "resnet18", "--checkpoint",
               str(resnet18_file), "--top-k", "1"]
    outputs = []
    for expected in (f"compiled resnet18 for 1x224x224 in .* s \\(\\d+ programs?; kept in "
                     f"{tmp_path / 'cache'} for next time\\)",
                     "resnet18 for 1x224x224 loaded from the compilation cache in"):
        # Programs are shared in memory by every run of an equal model (models.programs): drop
        # them, as a new process would start without them.
        jax.clear_caches()
        assert cli.main(command) == 0
        captured = capsys.readouterr()
        lines = captured.err.splitlines()
        assert lines[0] == ("resnext-flax: compiling resnet18 for 1x224x224, or loading it "
                            "from the compilation cache..."), captured.err
        assert re.match("resnext-flax: " + expected, lines[1]), captured.err
        outputs.append(captured.out)
    assert outputs[0] == outputs[1]
    assert cli.main([*command, "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "resnext-flax:" not in captured.err and captured.out == outputs[0]


def test_convert_says_what_it_does_while_it_verifies(resnet18_file, tmp_path, monkeypatch,
                                                     capsys):
    monkeypatch.setenv(compilation.ENV, str(tmp_path / "cache"))
    command = ["convert", str(resnet18_file), "--probe-size", "64"]
    assert cli.main([*command, "-o", str(tmp_path / "a.safetensors")]) == 0
    err = capsys.readouterr().err
    assert f"resnext-flax: reading {resnet18_file}\n" in err
    assert "resnext-flax: verifying resnet18 against torchvision\n" in err
    assert "convert: 1/2" in err and "torchvision's resnet18 on a 2x64x64 probe batch" in err
    assert "convert: 2/2" in err and "done" in err
    assert "resnext-flax: compiled resnet18 for 2x64x64 in " in err
    assert cli.main([*command, "-o", str(tmp_path / "b.safetensors"), "--no-progress"]) == 0
    assert capsys.readouterr().err == ""

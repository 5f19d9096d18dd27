"""The ``resnext-flax`` command end to end, with a local checkpoint (no download)."""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys

import pytest
import torch_reference
from limits import CHILD_TIMEOUT
from pretrained_helpers import (
    sample_image_paths,
    save_torchvision_file,
    torch_top_k,
    torchvision_pipeline,
)
from torchvision.models import get_model_weights

import resnext_flax
from resnext_flax import ResnextFlaxError, cli, list_weight_sets, load_model
from resnext_flax.cli.common import fix_renderer, render_error
from resnext_flax.errors import Fix

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINE = re.compile(r"^\s+(\d+)\. (.+?)\s+(\d+\.\d\d)%$")


@pytest.fixture(scope="module")
def resnet18(tmp_path_factory):
    model = torch_reference.torch_model("resnet18", seed=11)
    return model, save_torchvision_file(model, tmp_path_factory.mktemp("w"), "resnet18")


def parse(output: str) -> dict[str, list[tuple[str, float]]]:
    results: dict[str, list[tuple[str, float]]] = {}
    current = None
    for line in output.splitlines():
        match = LINE.match(line)
        if match:
            results[current].append((match.group(2), float(match.group(3))))
        else:
            current = line
            results[current] = []
    return results


def test_predict_matches_torchvision(resnet18, capsys):
    torch_model, pth = resnet18
    paths = sample_image_paths()
    status = cli.main(["predict", *paths, "--model", "resnet18", "--checkpoint", str(pth),
                       "--top-k", "3"])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    results = parse(captured.out)
    assert list(results) == paths
    _, logits = torchvision_pipeline(torch_model, "resnet18", paths)
    probabilities, indices = torch_top_k(logits, 3)
    categories = get_model_weights("resnet18").DEFAULT.meta["categories"]
    for i, path in enumerate(paths):
        assert [label for label, _ in results[path]] == [categories[j] for j in indices[i]]
        for (_, percent), p in zip(results[path], probabilities[i], strict=True):
            assert percent == pytest.approx(100 * p, abs=0.005 + 1e-6)


def test_list(capsys):
    assert cli.main(["list", "--source", "torchvision"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:4] == ["model", "weights", "acc@1", "acc@5"]
    rows = out[2:]
    assert len(rows) == len(list_weight_sets(source="torchvision")) == 17
    assert re.match(r"resnet50\s+IMAGENET1K_V2 \(DEFAULT\)\s+80\.858\s+95\.434\s+25\.6M\s+4\.09"
                    r"\s+97\.8 MB\s+232/224\s+BSD-3-Clause\s+torchvision$", rows[3])
    assert cli.main(["list"]) == 0
    assert len(capsys.readouterr().out.splitlines()[2:]) == len(list_weight_sets())
    assert cli.main(["list", "--model", "resnext101_64x4d"]) == 0
    rows = capsys.readouterr().out.splitlines()[2:]
    assert len(rows) == 1 and "IMAGENET1K_V1 (DEFAULT)" in rows[0] and "83.246" in rows[0]


def test_errors(tmp_path, resnet18, capsys):
    image = sample_image_paths()[0]
    missing = str(tmp_path / "missing.pth")
    assert cli.main(["predict", image, "--model", "resnet18", "--checkpoint", missing]) == 1
    assert f"no checkpoint file at {missing!r}" in capsys.readouterr().err
    assert cli.main(["predict", image, "--model", "resnet18", "--weights", "V3",
                     "--checkpoint", str(resnet18[1])]) == 1
    assert "resnet18 has no weight set 'V3'" in capsys.readouterr().err
    assert cli.main(["predict", str(tmp_path / "nope.jpg"), "--model", "resnet18",
                     "--checkpoint", str(resnet18[1])]) == 1
    assert "no image file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        cli.main(["predict", image, "--model", "resnet19"])
    assert info.value.code == 2
    with pytest.raises(SystemExit):
        cli.main([])


def test_a_fix_is_spelled_with_flags_the_subcommand_takes(tmp_path, resnet18, capsys):
    import torch

    torch_model, _ = resnet18
    two = str(tmp_path / "two.pth")
    torch.save({"student": torch_model.state_dict(), "teacher": torch_model.state_dict()}, two)
    image = sample_image_paths()[0]
    predict = ["predict", image, "--model", "resnet18", "--checkpoint", two, "--top-k", "1"]
    assert cli.main(predict) == 1
    err = capsys.readouterr().err
    flags = re.findall(r"key='student' \((--[^)]*)\)", err)
    assert flags == ["--key student"], err
    assert cli.parser().parse_args([*predict, *shlex.split(flags[0])]).key == "student"
    assert cli.main([*predict, *shlex.split(flags[0])]) == 0
    assert capsys.readouterr().out.splitlines()[0] == image

    # finetune takes no --key: the fix is the convert command, whose output it starts from.
    with pytest.raises(ResnextFlaxError) as info:
        load_model(two, "resnet18")
    finetune = ["finetune", str(tmp_path), "--model", "resnet18", "--checkpoint", two]
    text = render_error(info.value, fix_renderer(cli.parser().parse_args(finetune)))
    match = re.search(r"key='student' \((resnext-flax convert .+?), then --checkpoint (\S+)\)",
                      text)
    assert match, text
    convert = cli.parser().parse_args(shlex.split(match.group(1))[1:])
    assert (convert.command, convert.input, convert.output, convert.key) == (
        "convert", two, match.group(2), "student")
    assert cli.parser().parse_args([*finetune[:-1], match.group(2)]).checkpoint == match.group(2)


@pytest.mark.parametrize("command", [["predict", "IMAGE"], ["evaluate", "DIR"],
                                     ["finetune", "DIR"], ["inspect", "FILE"],
                                     ["convert", "FILE", "--output", "OUT"], ["list"]])
def test_every_fix_a_subcommand_spells_as_flags_parses(command):
    examples = {"name": "resnet50", "prefix": "a.", "ema": True, "key": "", "num_classes": 3,
                "trust_pickle": True}
    model = [] if command == ["list"] else ["--model", "resnet18"]
    args = cli.parser().parse_args([*command, *model])
    for keyword, value in examples.items():
        text = fix_renderer(args)(Fix.of(**{keyword: value}))
        flags = re.fullmatch(r".+? \((--.*)\)", text)
        if keyword in getattr(args, "fix_keywords", ()):
            parsed = cli.parser().parse_args([*command, *model, *shlex.split(flags.group(1))])
            assert getattr(parsed, "model" if keyword == "name" else keyword) == value
        else:
            assert flags is None, text


def test_console_script_and_module_entry_point():
    with open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8") as f:
        pyproject = f.read()  # (tomllib needs Python 3.11; we support 3.10)
    assert '[project.scripts]\nresnext-flax = "resnext_flax.cli:main"\n' in pyproject
    result = subprocess.run([sys.executable, "-m", "resnext_flax.cli", "list", "--model",
                             "resnet18"], capture_output=True, text=True, timeout=CHILD_TIMEOUT,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr
    assert "IMAGENET1K_V1 (DEFAULT)" in result.stdout


def test_example_script(resnet18, capsys, monkeypatch):
    import runpy

    paths = sample_image_paths()
    monkeypatch.setattr(sys, "argv", ["classify.py", *paths, "--model", "resnet18",
                                      "--checkpoint", str(resnet18[1])])
    runpy.run_path(os.path.join(ROOT, "examples", "classify.py"), run_name="__main__")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == paths[0] and lines[6] == paths[1]
    assert all(re.match(r"^\s+\d+\.\d\d%  \S", line) for line in lines[1:6] + lines[7:])


def test_the_command_imports_the_library_inside_its_subcommands():
    """Module-level imports of the CLI stay light (argparse, the variant table, the errors),
    so ``--help`` and ``list`` do not wait for JAX programs, optax or torch; each subcommand
    imports what it runs inside ``run``."""
    import ast
    import pathlib

    light = {"argparse", "contextlib", "os", "sys", "json", "collections.abc", "typing",
             "__future__",
             "resnext_flax.errors", "resnext_flax.models.variants",
             "resnext_flax.distributed"}  # its flags import no JAX (test_distributed.py)
    for path in pathlib.Path(cli.__file__).parent.glob("*.py"):
        for node in ast.parse(path.read_text()).body:
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) else [])
            heavy = [n for n in names if n not in light and not n.startswith("resnext_flax.cli")]
            assert not heavy, f"{path.name} imports {heavy} at module level"


# ---- where commands write, and how they end ---------------------------------------------------


@pytest.fixture(scope="module")
def three_classes(tmp_path_factory):
    """A 3-class folder and a converted 3-class ResNet-18 checkpoint for it."""
    from folder_helpers import learnable_folder

    root = tmp_path_factory.mktemp("three")
    learnable_folder(root / "data", 2)
    pth = save_torchvision_file(torch_reference.torch_model("resnet18", seed=3, num_classes=3),
                                root / "w", "resnet18")
    converted = root / "r18.safetensors"
    resnext_flax.save_checkpoint(load_model(pth, "resnet18"), converted)
    return root / "data", pth, converted


def _cli_without_jax(*argv: str) -> subprocess.CompletedProcess:
    """The command in a child that fails if it imported JAX: the error came before any work."""
    code = ("import sys\nfrom resnext_flax import cli\nstatus = cli.main(sys.argv[1:])\n"
            "assert 'jax' not in sys.modules, 'imported JAX'\nsys.exit(status)")
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                          timeout=CHILD_TIMEOUT)


def test_evaluate_json_never_replaces_the_checkpoint(three_classes, tmp_path, monkeypatch,
                                                     capsys):
    folder, pth, converted = three_classes
    for checkpoint in (pth, converted):
        before = checkpoint.read_bytes()
        result = _cli_without_jax("evaluate", str(folder), "--model", "resnet18",
                                  "--checkpoint", str(checkpoint), "--json", str(checkpoint))
        assert result.returncode == 1, result.stderr
        assert result.stderr == (f"resnext-flax: error: --json {str(checkpoint)!r} is the "
                                 f"input file {str(checkpoint)!r}; choose another output path "
                                 "(the input would be overwritten)\n")
        assert checkpoint.read_bytes() == before
    # An image of the folder (found once it is scanned) is refused too, before the model loads.
    from resnext_flax import evaluation

    monkeypatch.setattr(evaluation, "evaluate_pretrained",
                        lambda *a, **k: pytest.fail("evaluated although --json is an input"))
    image = sorted((folder / "china").iterdir())[0]
    before = image.read_bytes()
    assert cli.main(["evaluate", str(folder), "--checkpoint", str(converted), "--json",
                     str(image), "--no-progress"]) == 1
    assert f"is the input file {str(image)!r}" in capsys.readouterr().err
    assert image.read_bytes() == before


@pytest.mark.parametrize("where", ["missing", "file", "read-only"])
def test_evaluate_json_that_cannot_be_written_fails_before_any_work(three_classes, tmp_path,
                                                                    where):
    folder, _, converted = three_classes
    if where == "read-only":
        if os.geteuid() == 0:
            # Permission bits do not bind root, so no folder is unwritable to it; the guard's
            # other refusals (missing, file) are asserted by the other two cases.
            pytest.skip("root writes into read-only folders; 'missing' and 'file' cover it")
        parent = tmp_path / "locked"
        parent.mkdir(mode=0o500)
        why = "is not writable"
    elif where == "file":
        parent = tmp_path / "a-file"
        parent.write_text("x")
        why = "is not a folder"
    else:
        parent = tmp_path / "missing"
        why = "does not exist"
    result = _cli_without_jax("evaluate", str(folder), "--checkpoint", str(converted),
                              "--json", str(parent / "out.json"))
    assert result.returncode == 1 and why in result.stderr, result.stderr
    assert str(parent) in result.stderr and len(result.stderr.splitlines()) == 1
    assert not (parent / "out.json").exists() and (where != "missing" or not parent.exists())


def test_finetune_output_dir_is_checked_before_any_work(three_classes, tmp_path):
    folder, _, converted = three_classes
    run = tmp_path / "run"
    run.mkdir()
    start = run / "best.safetensors"
    start.write_bytes(converted.read_bytes())
    cases = {str(folder / "run"): "is inside the input folder",
             str(run): "would receive best.safetensors, which is the input",
             str(tmp_path / "no" / "run"): "does not exist",
             str(start): "is a file; name a folder"}
    for output, why in cases.items():
        result = _cli_without_jax("finetune", str(folder), "--model", "resnet18",
                                  "--checkpoint", str(start), "--output-dir", output)
        assert result.returncode == 1 and why in result.stderr, (output, result.stderr)
    assert sorted(os.listdir(run)) == ["best.safetensors"]
    assert start.read_bytes() == converted.read_bytes() and not (tmp_path / "no").exists()
    assert sorted(p.name for p in folder.iterdir()) == ["china", "digits", "flower"]


def test_predict_takes_the_model_a_converted_checkpoint_records(three_classes, capsys):
    _, pth, converted = three_classes
    image = sample_image_paths()[0]
    assert cli.main(["predict", image, "--checkpoint", str(converted), "--no-progress"]) == 0
    without = capsys.readouterr().out
    assert cli.main(["predict", image, "--model", "resnet18", "--checkpoint", str(converted),
                     "--no-progress"]) == 0
    assert capsys.readouterr().out == without and without.startswith(image)
    assert cli.main(["predict", image, "--checkpoint", str(pth)]) == 1
    assert f"--model is required: {str(pth)!r} does not record its model" in (
        capsys.readouterr().err)
    assert cli.main(["predict", image]) == 1
    assert "--model is required unless --checkpoint" in capsys.readouterr().err


def _help(*command: str) -> str:
    result = subprocess.run([sys.executable, "-m", "resnext_flax.cli", *command, "--help"],
                            capture_output=True, text=True, timeout=CHILD_TIMEOUT,
                            env={**os.environ, "COLUMNS": "1000"})
    assert result.returncode == 0, result.stderr
    return result.stdout


def _option_help(text: str, flag: str) -> str:
    """The help entry of `flag`: its line and the lines indented under it."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines)
                 if re.match(rf"\s+{re.escape(flag)}[ ,=]|\s+{re.escape(flag)}$", line)
                 or re.match(rf"\s+-\w, {re.escape(flag)}\b", line))
    entry = [lines[start]]
    for line in lines[start + 1:]:
        if not line.startswith(" " * 4) or line.strip().startswith("-"):
            break
        entry.append(line)
    return " ".join(part.strip() for part in entry)


def test_finetune_help_shows_the_defaults_a_run_uses():
    import dataclasses

    from resnext_flax.augment import Augmentation
    from resnext_flax.cli.finetune import _CONFIG_OPTIONS
    from resnext_flax.finetuning import FinetuneConfig

    text = _help("finetune")
    defaults = {f.name: f.default for f in dataclasses.fields(FinetuneConfig)}
    defaults.update(min_scale=Augmentation().scale[0], hflip=Augmentation().hflip)
    for option in (*_CONFIG_OPTIONS, "min_scale", "hflip"):
        if defaults[option] is None:
            continue
        entry = _option_help(text, "--" + option.replace("_", "-"))
        assert f"(default: {defaults[option]}" in entry, entry


@pytest.mark.parametrize("command", ["predict", "evaluate", "finetune", "convert", "inspect",
                                     "list"])
def test_every_option_with_a_default_says_it(command):
    """argparse's own defaults (not None, not a store_true False) appear in the help text."""
    parser = cli.parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    text = _help(command)
    for action in sub.choices[command]._actions:
        if action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            continue
        entry = _option_help(text, action.option_strings[-1])
        assert f"(default: {action.default}" in entry, entry


def _start(*argv: str, interrupt: int) -> tuple[int, str]:
    """Run a command, send `interrupt` once it says it is working, and return its status and
    stderr."""
    # Ctrl-C as in a terminal, even where this process was started with SIGINT ignored.
    code = ("import signal, sys\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
            "from resnext_flax import cli\nsys.exit(cli.main(sys.argv[1:]))")
    child = subprocess.Popen(
        [sys.executable, "-c", code, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    first = child.stderr.readline()
    assert first.startswith("resnext-flax: compiling"), first
    child.send_signal(interrupt)
    _, rest = child.communicate(timeout=CHILD_TIMEOUT)
    return child.returncode, first + rest


@pytest.mark.parametrize(("signal_name", "status", "word"), [("SIGTERM", 143, "terminated"),
                                                             ("SIGINT", 130, "interrupted")])
def test_a_signal_ends_a_command_with_the_shell_status_and_no_traceback(
        three_classes, signal_name, status, word):
    import signal

    folder, _, converted = three_classes
    code, err = _start("evaluate", str(folder), "--checkpoint", str(converted),
                       "--no-compilation-cache", interrupt=getattr(signal, signal_name))
    assert code == status, err
    assert "Traceback" not in err and err.rstrip().endswith(f"resnext-flax: {word}"), err


def test_evaluate_json_names_what_was_measured_and_stderr_has_no_warnings(three_classes,
                                                                           tmp_path):
    folder, _, converted = three_classes
    out = tmp_path / "eval.json"
    result = subprocess.run(
        [sys.executable, "-W", "default", "-m", "resnext_flax.cli", "evaluate", str(folder),
         "--checkpoint", str(converted), "--batch-size", "4", "--json", str(out),
         "--workers", "2", "--no-progress"], capture_output=True, text=True, timeout=CHILD_TIMEOUT,
        env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr
    assert "Warning" not in result.stderr, result.stderr
    report = json.loads(out.read_text())
    assert report["model"] == "resnet18"
    assert report["weights"] == "resnet18.IMAGENET1K_V1"  # resolved, not DEFAULT
    assert report["checkpoint"] == str(converted.resolve())


def test_packaging_metadata_has_no_warnings():
    result = subprocess.run([sys.executable, "-W", "default", "setup.py", "--name"], cwd=ROOT,
                            capture_output=True, text=True, timeout=CHILD_TIMEOUT)
    assert result.returncode == 0 and result.stdout.strip() == "resnext-flax", result.stderr
    assert "Warning" not in result.stderr, result.stderr


def test_python_dash_m_runs_the_command():
    result = subprocess.run([sys.executable, "-m", "resnext_flax", "list", "--model",
                             "resnet18"], capture_output=True, text=True, timeout=CHILD_TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert "IMAGENET1K_V1 (DEFAULT)" in result.stdout


def test_predict_with_a_missing_checkpoint_says_the_file_is_missing(tmp_path, capsys):
    missing = tmp_path / "nothere.safetensors"
    assert cli.main(["predict", str(tmp_path / "img.png"), "--checkpoint", str(missing)]) == 1
    err = capsys.readouterr().err
    assert err == f"resnext-flax: error: no file or folder at {str(missing)!r} (--checkpoint)\n"

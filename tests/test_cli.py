"""The ``resnext-flax`` command end to end, with a local checkpoint (no download)."""

from __future__ import annotations

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
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:4] == ["model", "weights", "acc@1", "acc@5"]
    rows = out[2:]
    assert len(rows) == len(list_weight_sets()) == 17
    assert re.match(r"resnet50\s+IMAGENET1K_V2 \(DEFAULT\)\s+80\.858\s+95\.434\s+25\.6M\s+4\.09"
                    r"\s+97\.8 MB\s+232/224$", rows[3])
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
             "resnext_flax.errors", "resnext_flax.models.variants"}
    for path in pathlib.Path(cli.__file__).parent.glob("*.py"):
        for node in ast.parse(path.read_text()).body:
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) else [])
            heavy = [n for n in names if n not in light and not n.startswith("resnext_flax.cli")]
            assert not heavy, f"{path.name} imports {heavy} at module level"

"""Fine-tuning resnet18 on a generated image folder (from a local file of random torchvision
weights: nothing can be downloaded): it learns, the exported checkpoint predicts what the
in-memory model predicts and carries the folder's class names to ``predict`` and
``from_pretrained``, and a run directory refuses other settings. Interrupt-and-resume
equality is tested through examples/finetune.py (tests/test_finetune.py)."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch_reference
from folder_helpers import learnable_folder
from PIL import Image
from pretrained_helpers import save_torchvision_file

from resnext_flax import cli, datasets, evaluation, finetuning, from_pretrained, parallel
from resnext_flax.cli import finetune as commands
from resnext_flax.errors import TrainingError
from resnext_flax.finetuning import FinetuneConfig, TrainConfig, finetune, initial_model
from resnext_flax.run_log import read_metrics
from resnext_flax.weights.checkpoint import read_checkpoint_labels

CLASSES = ("china", "digits", "flower")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    learnable_folder(root / "train", 30, seed=0)
    learnable_folder(root / "val", 30, seed=1)
    pth = save_torchvision_file(torch_reference.torch_model("resnet18", seed=2), root / "w",
                                "resnet18")
    argv = [str(root / "train"), "--model", "resnet18", "--weights", str(pth), "--epochs",
            "4", "--batch-size", "10", "--optimizer", "adamw", "--lr", "0.002",
            "--warmup-epochs", "0.5", "--resize-size", "36", "--crop-size", "32",
            "--min-scale", "0.25", "--output-dir", str(root / "out"), "--no-progress"]
    config = commands.config_from_args(commands.finetune_parser().parse_args(argv))
    result = finetune(root / "train", config, root / "out", progress=False)
    return root, argv, config, result


@pytest.fixture(scope="module")
def evaluated(run):
    """The validation folder through the in-memory model and through the exported file."""
    root, _, _, result = run
    val = datasets.image_folder(root / "val")
    ours = evaluation.evaluate(result.state.model(), val, preprocessing=result.preprocessing,
                               batch_size=10, progress=False)
    programs = evaluation._sharded_outputs(parallel.data_mesh(), len(CLASSES))._cache_size
    compiled = programs()
    exported = from_pretrained("resnet18", checkpoint=result.best_path)
    again = evaluation.evaluate(exported, val, preprocessing=result.preprocessing,
                                batch_size=10, progress=False)
    # The exported model, loaded again in another mode, runs the program already compiled.
    assert programs() == compiled
    print(f"validation acc@1 {100 * ours.top1:.2f}% (exported {100 * again.top1:.2f}%)")
    return val, ours, again


def test_learns_and_exports_the_model_it_trained(run, evaluated):
    root, _, _, result = run
    _, ours, again = evaluated
    assert result.classes == CLASSES and result.best_epoch == 4  # no validation: the last
    assert int(result.state.step) == 4 * (91 // 10)
    # 90 readable validation images of 3 classes: chance is 1/3, and a guessing model gets
    # 60 or more right with probability 1e-10. Measured: 96.7% (87/90) after these 36 steps.
    assert ours.num_images == 90 and ours.num_skipped == 1 and ours.top1 >= 60 / 90
    np.testing.assert_array_equal(again.predictions, ours.predictions)
    classes, preprocessing = read_checkpoint_labels(result.best_path)
    assert classes == CLASSES and preprocessing == result.preprocessing
    assert (preprocessing.resize_size, preprocessing.crop_size) == (36, 32)
    history = json.loads((root / "out" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    # One metrics line per epoch, as the history; the learning rate the epoch ended with.
    assert read_metrics(root / "out" / "metrics.jsonl") == history
    ends = [(9 * epoch - 1) / 9 for epoch in (1, 2, 3, 4)]  # 9 steps an epoch, warm-up 0.5
    assert [h["lr"] for h in history] == pytest.approx(
        [0.002 * (1 + math.cos(math.pi * (t - 0.5) / 3.5)) / 2 for t in ends])
    with Image.open(root / "out" / "metrics.png") as plot:
        assert plot.format == "PNG" and plot.width > 600


def test_predict_prints_the_folder_classes(run, evaluated, capsys):
    root, _, _, result = run
    val, ours, _ = evaluated
    image = str(root / "val" / "flower" / "005.png")
    assert cli.main(["predict", image, "--model", "resnet18", "--checkpoint",
                     result.best_path, "--top-k", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    labels = [line.split()[1] for line in lines[1:]]
    assert sorted(labels) == sorted(CLASSES)
    assert labels[0] == CLASSES[ours.predictions[val.paths.index(image), 0]]


def test_a_finished_run_resumes_to_itself_and_other_settings_are_refused(run, capsys):
    root, argv, config, result = run
    again = finetune(root / "train", config, root / "out", progress=False)
    assert int(again.state.step) == int(result.state.step) and again.history == result.history
    for a, b in zip(np.asarray(again.state.params["fc"]["kernel"]),
                    np.asarray(result.state.params["fc"]["kernel"]), strict=True):
        np.testing.assert_array_equal(a, b)
    assert cli.main(["finetune", *argv[:-1], "--lr", "0.01"]) == 1
    assert "holds a run with other settings (lr: 0.002 -> 0.01): rerun with its settings" in (
        capsys.readouterr().err)


@pytest.mark.parametrize("new_head,classes,replaced", [
    (True, 1000, True), (None, 1000, False), (None, 3, True), (False, 1000, False)])
def test_new_head_replaces_the_weights_head_only_when_asked(tmp_path, new_head, classes,
                                                            replaced):
    pth = save_torchvision_file(torch_reference.torch_model("resnet18", seed=4), tmp_path,
                                "resnet18")
    start = from_pretrained("resnet18", checkpoint=pth)
    config = TrainConfig(model="resnet18", weights=str(pth), new_head=new_head)
    model, _ = initial_model(config, classes)
    assert model.num_classes == classes
    same = np.array_equal(np.asarray(model.fc.kernel[...])[:, :3],
                          np.asarray(start.fc.kernel[...])[:, :3])
    assert same is not replaced
    # The backbone is the file's whatever happens to the head.
    np.testing.assert_array_equal(np.asarray(model.conv1.kernel[...]),
                                  np.asarray(start.conv1.kernel[...]))


def test_a_kept_head_of_another_size_is_refused(tmp_path):
    pth = save_torchvision_file(torch_reference.torch_model("resnet18", seed=4), tmp_path,
                                "resnet18")
    config = TrainConfig(model="resnet18", weights=str(pth), new_head=False)
    with pytest.raises(ValueError, match="head of 1000 classes, but the data has 3"):
        initial_model(config, 3)


def test_training_defaults_start_from_scratch_and_finetuning_from_the_weights():
    assert (TrainConfig(model="resnet18").weights, TrainConfig(model="resnet18").new_head) == (
        None, None)
    assert (FinetuneConfig(model="resnet18").weights,
            FinetuneConfig(model="resnet18").new_head) == ("DEFAULT", True)
    with pytest.raises(ValueError, match="train_crop_size must be a positive integer"):
        TrainConfig(model="resnet18", train_crop_size=0)
    with pytest.raises(ValueError, match="whole number of warm-up epochs"):
        TrainConfig(model="resnet18", warmup_epochs=0.5, schedule_unit="epoch")
    with pytest.raises(ValueError, match="norm_weight_decay must be a finite number"):
        TrainConfig(model="resnet18", norm_weight_decay=-1.0)


def test_options_before_any_work(tmp_path):
    model, preprocessing = initial_model(FinetuneConfig(model="resnet18", weights=None,
                                                        bf16=True, crop_size=48), 5)
    assert model.dtype == jnp.bfloat16 and model.num_classes == 5
    assert (preprocessing.resize_size, preprocessing.crop_size) == (256, 48)
    learnable_folder(tmp_path / "few", 2)
    with pytest.raises(datasets.DatasetError, match="fewer than one batch of 64"):
        finetune(tmp_path / "few", FinetuneConfig(model="resnet18", weights=None),
                 tmp_path / "out", progress=False)
    with pytest.raises(FileNotFoundError, match="no weights file"):
        initial_model(FinetuneConfig(model="resnet18", weights=str(tmp_path / "x.pth")), 2)
    with pytest.raises(ValueError, match="optimizer must be"):
        FinetuneConfig(model="resnet18", optimizer="adam")
    with pytest.raises(ValueError, match="epochs must be an integer, got nan"):
        FinetuneConfig(model="resnet18", epochs=float("nan"))
    with pytest.raises(ValueError, match=r"momentum must be a finite number in \[0, 1\)"):
        FinetuneConfig(model="resnet18", momentum=-0.1)
    (tmp_path / "one" / "only").mkdir(parents=True)
    learnable_folder(tmp_path / "one" / "only", 1)
    with pytest.raises(datasets.DatasetError, match="needs at least 2 classes"):
        finetune(datasets.ImageDataset(("a.png",), np.zeros(1), ("only",), "x"),
                 FinetuneConfig(model="resnet18"), tmp_path / "o", progress=False)


def _same_state(a, b):
    for x, y in zip(jax.tree.leaves((a.params, a.batch_stats, a.opt_state, a.step)),
                    jax.tree.leaves((b.params, b.batch_stats, b.opt_state, b.step)),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _step_that(monkeypatch, act):
    """Fine-tuning's train step, with `act(call, state, metrics)` run around its calls
    (counted from 1); the real step is the one already compiled for the run fixture."""
    real = finetuning._train_step
    calls = []

    def wrapped(*args):
        step = real(*args)

        def run(state, images, labels):
            calls.append(None)
            return act(len(calls), step, state, images, labels)

        return run

    monkeypatch.setattr(finetuning, "_train_step", wrapped)


def test_an_interrupt_inside_a_step_saves_the_batches_consumed_and_resumes(
        run, tmp_path, monkeypatch):
    root, _, config, result = run

    def interrupt_third(call, step, state, images, labels):
        if call == 3:  # batch 3 was drawn, its update never happens (as in a first compile)
            raise KeyboardInterrupt
        return step(state, images, labels)

    _step_that(monkeypatch, interrupt_third)
    with pytest.raises(KeyboardInterrupt):
        finetune(root / "train", config, tmp_path / "out", progress=False)
    monkeypatch.undo()
    [saved] = [path for path in (tmp_path / "out" / "checkpoints" / "2" / "data").rglob("*")
               if path.is_file() and "position" in path.read_text(errors="replace")]
    assert json.loads(saved.read_text()) == {"position": 2}
    # Checkpoints written before this was fixed also counted the batch drawn for the step
    # that never finished; they resume at the same place.
    saved.write_text(json.dumps({"position": 3}))
    resumed = finetune(root / "train", config, tmp_path / "out", progress=False)
    _same_state(resumed.state, result.state)
    timeless = [{k: v for k, v in h.items() if k != "images_per_second"}
                for h in (*resumed.history, *result.history)]
    assert timeless[:4] == timeless[4:]


def test_an_interrupt_at_the_end_of_the_last_epoch_is_finished_by_the_rerun(run, tmp_path):
    """Ctrl-C after the last step, before its epoch was validated, recorded and exported: the
    checkpoint holds the step; the rerun does that epoch's end and writes the model."""
    root, _, config, result = run
    last = int(result.state.step)

    def interrupt_last(step, metrics):
        if step == last:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(root / "train", config, tmp_path / "out", progress=False,
                 on_step=interrupt_last)
    resumed = finetune(root / "train", config, tmp_path / "out", progress=False)
    _same_state(resumed.state, result.state)
    timeless = [{k: v for k, v in h.items() if k != "images_per_second"}
                for h in (*resumed.history, *result.history)]
    assert len(resumed.history) == config.epochs and timeless[:4] == timeless[4:]
    assert (tmp_path / "out" / "best.safetensors").is_file()
    assert resumed.best_epoch == result.best_epoch
    history = json.loads((tmp_path / "out" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    timed = ("images_per_second",)  # a resumed run's metrics file holds each epoch once
    assert [{k: v for k, v in h.items() if k not in timed}
            for h in read_metrics(tmp_path / "out" / "metrics.jsonl")] == timeless[:4]


def test_an_interrupt_before_any_step_saves_nothing(run, tmp_path, monkeypatch):
    root, _, config, _ = run

    def interrupt(call, step, state, images, labels):
        raise KeyboardInterrupt

    _step_that(monkeypatch, interrupt)
    with pytest.raises(KeyboardInterrupt):
        finetune(root / "train", config, tmp_path / "out", progress=False)
    assert not list((tmp_path / "out" / "checkpoints").iterdir())


def test_a_non_finite_loss_stops_the_run_and_nothing_is_written(run, tmp_path, monkeypatch):
    root, _, config, result = run

    def diverge_at_five(call, step, state, images, labels):
        state, metrics = step(state, images, labels)
        if call >= 5:
            params = jax.tree.map(lambda x: x * jnp.nan, state.params)
            state = state.replace(params=params)
            metrics = {**metrics, "loss": jnp.float32(jnp.nan)}
        return state, metrics

    _step_that(monkeypatch, diverge_at_five)
    with pytest.raises(TrainingError, match=r"the training loss became nan at step 5 \(epoch "
                                            r"1, step 5 of 9\).*lower the learning rate"):
        finetune(root / "train", dataclasses.replace(config, save_every=5), tmp_path / "out",
                 progress=False)
    assert not (tmp_path / "out" / "best.safetensors").exists()
    assert not list((tmp_path / "out" / "checkpoints").iterdir())
    # The export itself refuses NaN weights.
    state = result.state
    bad = state.replace(params={**state.params, "fc": {**state.params["fc"], "bias": jnp.full(
        state.params["fc"]["bias"].shape, jnp.inf)}})
    target = tmp_path / "best.safetensors"
    with pytest.raises(TrainingError, match=r"refusing to write .*best.safetensors: NaN or Inf "
                                            r"in params.fc.bias$"):
        finetuning._export(bad, str(target), CLASSES, result.preprocessing, config,
                           {"epoch": 1})
    assert not target.exists()


def test_a_run_resumes_only_on_its_own_data(run, tmp_path):
    root, _, config, result = run
    # The same files elsewhere resume (paths are compared relative to the folder).
    shutil.copytree(root / "train", tmp_path / "moved")
    again = finetune(tmp_path / "moved", config, root / "out", progress=False)
    assert int(again.state.step) == int(result.state.step)
    # Other images under the same class names (and as many) do not.
    learnable_folder(tmp_path / "other", 30, seed=7)
    with pytest.raises(TrainingError, match=r"holds a run with other settings \(data.train: "
                                            r"other images \(paths, sizes or labels\)\)"):
        finetune(tmp_path / "other", config, root / "out", progress=False)


def test_a_run_saved_without_its_data_fingerprint_still_resumes(run, tmp_path):
    """Runs written before the data was fingerprinted resume, saying the data is unchecked."""
    root, _, config, result = run
    shutil.copytree(root / "out", tmp_path / "out")
    step = int(result.state.step)
    [record] = [path for path in (tmp_path / "out" / "checkpoints" / str(step) / "run").rglob("*")
                if path.is_file() and '"history"' in path.read_text(errors="replace")]
    saved = json.loads(record.read_text())
    del saved["data"]
    record.write_text(json.dumps(saved))
    said = []
    again = finetune(root / "train", config, tmp_path / "out", progress=False, log=said.append)
    assert int(again.state.step) == step
    assert any("data was not recorded" in line for line in said), said


def test_more_epochs_need_extend_and_rebuild_the_schedule(run, tmp_path, capsys):
    root, argv, config, result = run
    shutil.copytree(root / "out", tmp_path / "out")
    argv = [*argv[:argv.index("--output-dir")], "--output-dir", str(tmp_path / "out")]
    assert cli.main(["finetune", *argv, "--no-progress", "--epochs", "5"]) == 1
    assert capsys.readouterr().err.strip().endswith(
        "holds a run with other settings (epochs: 4 -> 5): to train it on to 5 epochs pass "
        "extend=True (--extend), or use another output directory")
    assert cli.main(["finetune", *argv, "--no-progress", "--epochs", "3", "--extend"]) == 1
    assert "(epochs: 4 -> 3): rerun with its settings" in capsys.readouterr().err
    longer = dataclasses.replace(config, epochs=5)
    extended = finetune(root / "train", longer, tmp_path / "out", progress=False, extend=True)
    assert int(extended.state.step) == 5 * 9 and len(extended.history) == 5
    assert extended.history[:4] == result.history
    # The schedule was rebuilt for 45 steps: the 4-epoch one is 0 from step 36 on, and would
    # have left the weights as they were.
    assert float(optax.warmup_cosine_decay_schedule(0.0, config.lr, 4, 36)(36)) == 0
    assert not np.array_equal(np.asarray(extended.state.params["fc"]["kernel"]),
                              np.asarray(result.state.params["fc"]["kernel"]))
    # Extended, the run now is a 5-epoch run: it resumes without extend, and only so.
    assert int(finetune(root / "train", longer, tmp_path / "out",
                        progress=False).state.step) == 45
    with pytest.raises(TrainingError, match=r"\(epochs: 5 -> 4\)"):
        finetune(root / "train", config, tmp_path / "out", progress=False)


@pytest.mark.parametrize(("flags", "message"), [
    (["--lr", "nan"], "lr must be a finite number > 0, got nan"),
    (["--lr", "inf"], "lr must be a finite number > 0, got inf"),
    (["--lr", "0"], "lr must be a finite number > 0, got 0.0"),
    (["--momentum", "1"], r"momentum must be a finite number in [0, 1), got 1.0"),
    (["--weight-decay", "nan"], "weight_decay must be a finite number >= 0, got nan"),
    (["--warmup-epochs", "inf"], "warmup_epochs must be a finite number >= 0, got inf"),
    (["--warmup-epochs", "nan"], "warmup_epochs must be a finite number >= 0, got nan"),
    (["--label-smoothing", "1"], r"label_smoothing must be a finite number in [0, 1), got 1.0"),
    (["--warmup-epochs", "1e308"],
     "warmup_epochs (1e+308) must not exceed epochs (10): the warm-up is part of the schedule"),
    (["--seed", "99999999999999999999999"], "seed must be from 0 to 4294967295 (the input "
     "pipeline's seed is 32-bit), got 99999999999999999999999"),
    (["--seed", "-1"], "seed must be from 0 to 4294967295 (the input pipeline's seed is "
     "32-bit), got -1"),
])
def test_bad_hyperparameters_are_one_line_errors(flags, message, tmp_path, capsys):
    learnable_folder(tmp_path / "train", 2)
    argv = ["finetune", str(tmp_path / "train"), "--model", "resnet18", "--weights", "none",
            "--output-dir", str(tmp_path / "out"), "--no-progress", *flags]
    assert cli.main(argv) == 1
    assert capsys.readouterr().err == f"resnext-flax: error: {message}\n"
    assert not (tmp_path / "out").exists()

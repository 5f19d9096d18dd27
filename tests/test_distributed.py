"""Many processes through ``jax.distributed``: where the settings come from (the arguments,
the environment, the launcher as JAX detects it), and two CPU processes on 127.0.0.1 training
like one process over the same global batches.

The multi-process run happens in child processes (this file run as a script: ``python
tests/test_distributed.py reference|worker FOLDER OUT``); they write their results as files
that the test compares.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from float64_state import in_float64
from folder_helpers import learnable_folder
from limits import CHILD_TIMEOUT
from test_parallel import FLOAT64_BOUND, FLOOR_ABSOLUTE, FLOOR_MULTIPLE

from resnext_flax import distributed

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent

# --------------------------------------------------------------------------------------------
# Where the settings come from (no processes started).

LAUNCHER_VARS = (
    "SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID",
    "SLURM_STEP_NUM_NODES", "OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE",
    "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "KUBERNETES_SERVICE_HOST",
    "JAX_COORDINATOR_PORT", *distributed.ENV_VARS.values(), *distributed.JAX_ENV_VARS.values())


@pytest.fixture
def env(monkeypatch):
    """No launcher and none of the settings in the environment; returns monkeypatch."""
    for var in LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def _slurm(env, *, tasks: int, rank: int, job: str = "12345") -> None:
    for var, value in (("SLURM_JOB_ID", job), ("SLURM_STEP_NODELIST", "gpu[003-004],cpu7"),
                       ("SLURM_NTASKS", str(tasks)), ("SLURM_PROCID", str(rank)),
                       ("SLURM_LOCALID", str(rank % 4)), ("SLURM_STEP_NUM_NODES", "2")):
        env.setenv(var, value)


def test_nothing_given_is_one_process(env):
    settings = distributed.resolve()
    assert settings == distributed.SINGLE_PROCESS and not settings.multi_process
    assert settings.describe() == "single process"


def test_settings_from_arguments(env):
    s = distributed.resolve("10.0.0.1:1234", 4, 3, [0, 1])
    assert (s.coordinator_address, s.num_processes, s.process_id, s.local_device_ids) == (
        "10.0.0.1:1234", 4, 3, (0, 1))
    assert s.multi_process and s.source == "arguments"
    assert s.describe() == ("process 3 of 4, coordinator 10.0.0.1:1234, local devices 0,1 "
                            "(from arguments)")


def test_settings_from_the_library_environment(env):
    env.setenv("RESNEXT_FLAX_COORDINATOR", "head-node:5555")
    env.setenv("RESNEXT_FLAX_NUM_PROCESSES", "2")
    env.setenv("RESNEXT_FLAX_PROCESS_ID", " 1")
    env.setenv("RESNEXT_FLAX_LOCAL_DEVICE_IDS", "2,3")
    s = distributed.resolve()
    assert (s.coordinator_address, s.num_processes, s.process_id, s.local_device_ids) == (
        "head-node:5555", 2, 1, (2, 3))
    # An argument wins over the environment, setting by setting.
    s = distributed.resolve(process_id=0)
    assert (s.process_id, s.num_processes) == (0, 2)
    assert s.source.split(", ")[0] == "RESNEXT_FLAX_COORDINATOR" and "arguments" in s.source


def test_jax_own_variables_are_read(env):
    """JAX_COORDINATOR_ADDRESS and JAX_LOCAL_DEVICE_IDS are jax.distributed's own names."""
    env.setenv("JAX_COORDINATOR_ADDRESS", "10.1.2.3:4000")
    env.setenv("JAX_LOCAL_DEVICE_IDS", "0")
    s = distributed.resolve(num_processes=8, process_id=7)
    assert (s.coordinator_address, s.local_device_ids) == ("10.1.2.3:4000", (0,))
    env.setenv("RESNEXT_FLAX_COORDINATOR", "10.9.9.9:4001")  # the library's name first
    assert distributed.resolve(num_processes=8, process_id=7).coordinator_address == (
        "10.9.9.9:4001")


def test_slurm_is_detected_by_jax(env):
    _slurm(env, tasks=8, rank=5)
    s = distributed.resolve()
    # JAX's rule: the first node of the step, a port derived from the job id in
    # [61440, 65535] (12345 % 4096 + 61440).
    assert (s.coordinator_address, s.num_processes, s.process_id) == ("gpu003:61497", 8, 5)
    assert s.source == "slurm (detected by jax)"
    assert s.local_device_ids is None  # JAX's default: one GPU per process under SLURM
    env.setenv("JAX_COORDINATOR_PORT", "7000")
    assert distributed.resolve().coordinator_address == "gpu003:7000"
    # An argument overrides what the launcher says.
    s = distributed.resolve("login:9000", local_device_ids="0,1,2,3")
    assert (s.coordinator_address, s.process_id, s.local_device_ids) == (
        "login:9000", 5, (0, 1, 2, 3))
    assert s.source == "arguments, slurm (detected by jax)"


def test_one_slurm_task_is_one_process(env):
    _slurm(env, tasks=1, rank=0)
    assert not distributed.resolve().multi_process
    assert distributed.initialize() == distributed.resolve()  # nothing to join


def test_open_mpi_is_detected_by_jax(env):
    env.setenv("OMPI_MCA_orte_hnp_uri", "1531576320.0;tcp://10.96.0.1,10.148.0.1:34911")
    env.setenv("OMPI_COMM_WORLD_SIZE", "4")
    env.setenv("OMPI_COMM_WORLD_RANK", "2")
    env.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "0")
    env.setenv("JAX_COORDINATOR_PORT", "6000")
    s = distributed.resolve()
    assert (s.coordinator_address, s.num_processes, s.process_id) == ("10.96.0.1:6000", 4, 2)
    assert s.source == "ompi (detected by jax)"


def test_half_the_settings_is_an_error(env):
    env.setenv("RESNEXT_FLAX_COORDINATOR", "10.0.0.1:1234")
    with pytest.raises(ValueError) as err:
        distributed.resolve()
    message = str(err.value)
    assert "got coordinator_address (from RESNEXT_FLAX_COORDINATOR)" in message
    assert "not num_processes, process_id" in message
    assert "RESNEXT_FLAX_NUM_PROCESSES" in message and "RESNEXT_FLAX_PROCESS_ID" in message
    env.delenv("RESNEXT_FLAX_COORDINATOR")
    with pytest.raises(ValueError, match="but not coordinator_address, process_id"):
        distributed.initialize(num_processes=2)


def test_local_device_ids_alone_are_one_process(env):
    env.setenv("JAX_LOCAL_DEVICE_IDS", "0,1")
    assert distributed.resolve() == distributed.SINGLE_PROCESS


@pytest.mark.parametrize(("arguments", "variables", "message"), [
    ({"process_id": 0}, {"RESNEXT_FLAX_NUM_PROCESSES": "two"},
     "RESNEXT_FLAX_NUM_PROCESSES must be an integer, got 'two'"),
    ({"num_processes": 2, "process_id": 2}, {}, "process_id must be from 0 to 1"),
    ({"num_processes": 2, "process_id": -1}, {}, "process_id must be from 0 to 1"),
    ({"num_processes": 0, "process_id": 0}, {}, "num_processes must be at least 1"),
    ({"num_processes": True, "process_id": 0}, {}, "num_processes must be an integer"),
    ({"num_processes": 2, "process_id": 0, "coordinator_address": "localhost"}, {},
     "coordinator_address must be 'host:port'"),
    ({"num_processes": 2, "process_id": 0}, {"RESNEXT_FLAX_COORDINATOR": "host:99999"},
     "RESNEXT_FLAX_COORDINATOR must be 'host:port'"),
    ({"num_processes": 2, "process_id": 0}, {"JAX_LOCAL_DEVICE_IDS": "0,-1"},
     "JAX_LOCAL_DEVICE_IDS must be device ids >= 0"),
])
def test_malformed_settings_are_refused(env, arguments, variables, message):
    arguments.setdefault("coordinator_address", "127.0.0.1:1234")
    for var, value in variables.items():
        if var == "RESNEXT_FLAX_COORDINATOR":
            arguments.pop("coordinator_address")
        env.setenv(var, value)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        distributed.resolve(**arguments)


def test_one_process_starts_nothing(env):
    """A no-op: no coordinator, no distributed client (the suite's own process stays a
    single-process JAX)."""
    import jax

    assert distributed.initialize() == distributed.SINGLE_PROCESS
    assert distributed.initialize(num_processes=1, process_id=0,
                                  coordinator_address="127.0.0.1:1").num_processes == 1
    assert not jax.distributed.is_initialized()
    assert distributed.is_main_process()


def test_command_line_flags(env):
    import argparse

    parser = argparse.ArgumentParser()
    distributed.add_arguments(parser)
    args = parser.parse_args(["--coordinator", "10.0.0.1:1234", "--num-processes", "4",
                              "--process-id", "2", "--local-device-ids", "0,1"])
    s = distributed.resolve(args.coordinator, args.num_processes, args.process_id,
                            args.local_device_ids)
    assert (s.coordinator_address, s.num_processes, s.process_id, s.local_device_ids) == (
        "10.0.0.1:1234", 4, 2, (0, 1))
    unset = parser.parse_args([])
    assert distributed.initialize_from_arguments(unset) == distributed.SINGLE_PROCESS
    with pytest.raises(ValueError, match="but not coordinator_address, process_id"):
        distributed.initialize_from_arguments(parser.parse_args(["--num-processes", "2"]))
    assert "--coordinator HOST:PORT" in parser.format_help()


def test_the_flags_import_no_jax():
    """A command's parser (its --help) is built without importing JAX."""
    code = ("import argparse, sys; from resnext_flax import distributed; "
            "distributed.add_arguments(argparse.ArgumentParser()); print('jax' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT, env=_child_env(1, {}))
    assert out.stdout.strip() == "False", out.stderr


# --------------------------------------------------------------------------------------------
# Two processes training like one.

BATCH = 8  # global; 2 processes x 2 devices, 2 images per device
EPOCHS = 2
PER_CLASS = 6  # 3 classes: 18 images and one unreadable file, 2 batches per epoch
DEVICES_PER_PROCESS = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child_env(devices: int, extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    flags = env.get("XLA_FLAGS", "")
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return {**env, **extra}


def _run_together(commands: list[tuple[list[str], dict[str, str]]], logs: pathlib.Path
                  ) -> None:
    """Run the children side by side; as soon as one fails the others are stopped (a worker
    whose peer died would wait for it). CHILD_TIMEOUT only catches hangs."""
    procs, files = [], []
    try:
        for i, (args, env) in enumerate(commands):
            out = open(logs / f"child{i}.log", "w")  # noqa: SIM115 - closed below
            files.append(out)
            procs.append(subprocess.Popen([sys.executable, __file__, *args], env=env,
                                          cwd=ROOT, stdout=out, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + CHILD_TIMEOUT
        while any(p.poll() is None for p in procs):
            failed = [i for i, p in enumerate(procs) if p.poll() not in (None, 0)]
            assert not failed, (logs / f"child{failed[0]}.log").read_text()[-4000:]
            assert time.monotonic() < deadline, f"children still running after {CHILD_TIMEOUT}s"
            time.sleep(0.5)
        for i, p in enumerate(procs):
            assert p.returncode == 0, (logs / f"child{i}.log").read_text()[-4000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in files:
            f.close()


def _load(path: pathlib.Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


def _rel(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    assert a.keys() == b.keys()
    return max(float(np.linalg.norm(a[k].astype(np.float64) - b[k])
                     / max(np.linalg.norm(b[k]), 1e-30)) for k in b)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("distributed")
    learnable_folder(root / "data", PER_CLASS)
    port = _free_port()
    workers = [(["worker", str(root / "data"), str(root)], _child_env(
        DEVICES_PER_PROCESS, {"RESNEXT_FLAX_COORDINATOR": f"127.0.0.1:{port}",
                              "RESNEXT_FLAX_NUM_PROCESSES": "2",
                              "RESNEXT_FLAX_PROCESS_ID": str(i)})) for i in range(2)]
    reference = (["reference", str(root / "data"), str(root)], _child_env(1, {}))
    _run_together([*workers, reference], root)
    return root


def test_two_processes_train_like_one(two_processes: pathlib.Path):
    """Two processes x two CPU devices, each reading its half of every global batch, take
    the same steps as one process on one device over the whole batches: equal in float64
    (the collectives' math), and in float32 within the float32 floor measured here (how far
    one device's float32 run drifts from its float64 run; see test_parallel.py)."""
    out = two_processes
    info = [json.loads((out / f"worker{i}.json").read_text()) for i in range(2)]
    for i, w in enumerate(info):
        assert (w["process_index"], w["process_count"]) == (i, 2)
        assert (w["device_count"], w["local_device_count"]) == (4, DEVICES_PER_PROCESS)
        assert w["is_main_process"] == (i == 0)
        assert w["steps"] == EPOCHS * ((3 * PER_CLASS + 1) // BATCH)
        assert w["different_states"].startswith(
            "1 of the 2 arrays to replicate differ between processes (['w']): every process "
            "must start from the same state"), w["different_states"]
    # Each process read its own half of every global batch.
    reference = json.loads((out / "reference.json").read_text())
    for step, whole in enumerate(reference["indices"]):
        halves = [w["indices"][step] for w in info]
        assert sorted(halves[0] + halves[1]) == sorted(whole)
        assert not set(halves[0]) & set(halves[1])
    # The metrics are the global batch's, the same on every process.
    assert info[0]["losses"] == info[1]["losses"] and info[0]["correct"] == info[1]["correct"]
    assert info[0]["correct"] == reference["correct"]
    exact_losses = np.array(reference["losses"]["float64"])

    def loss_error(losses: list[float]) -> float:
        return float(np.max(np.abs(np.array(losses) - exact_losses) / exact_losses))

    runs = {name: _load(out / f"{name}.npz") for name in (
        "reference-float64", "reference-float32", "worker-float64", "worker-float32")}

    def drift(name: str, kind: str) -> float:
        """Relative error of run `name`'s `kind` leaves against the float64 reference."""
        exact = {k: v for k, v in runs["reference-float64"].items() if k.startswith(kind)}
        assert exact, kind
        return _rel({k: runs[name][k] for k in exact}, exact)

    errors = {"loss": (loss_error(info[0]["losses"]["float64"]),
                       loss_error(info[0]["losses"]["float32"]),
                       loss_error(reference["losses"]["float32"])),
              **{kind: (drift("worker-float64", kind), drift("worker-float32", kind),
                        drift("reference-float32", kind))
                 for kind in ("['params']", "['batch_stats']")}}
    for kind, (float64, float32, floor) in errors.items():
        assert float64 <= FLOAT64_BOUND, (kind, errors)
        assert float32 <= FLOOR_MULTIPLE * floor + FLOOR_ABSOLUTE, (
            f"{kind}: two processes' float32 drift from float64 {float32:.2e} > "
            f"{FLOOR_MULTIPLE:g} x one process's float32 floor {floor:.2e} + {FLOOR_ABSOLUTE:g}")
    moved = _rel(_load(out / "initial.npz"), {k: v for k, v in runs["reference-float64"].items()
                                              if k.startswith("['params']")})
    assert moved > 1e-3  # the steps did something


def test_orbax_checkpoint_saved_by_both_processes(two_processes: pathlib.Path):
    """Both processes call the checkpoint manager (a collective); the checkpoint holds the
    trained, replicated state once, and a single process restores it."""
    import jax
    import orbax.checkpoint as ocp

    out = two_processes
    # A target of host arrays: restored on this process's one device, not the four saved from.
    target = {"params": jax.tree.map(lambda a: np.zeros(a.shape, a.dtype),
                                     _start(np.float32).params)}
    manager = ocp.CheckpointManager(out / "checkpoints", item_names=("state", "run"))
    restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), run=ocp.args.JsonRestore()))
    assert restored.run == {"step": _steps(out)}
    trained, params = _load(out / "worker-float32.npz"), _flat(restored.state)
    assert params.keys() == {k for k in trained if k.startswith("['params']")}
    for key, value in params.items():
        np.testing.assert_array_equal(value, trained[key])


def _steps(out: pathlib.Path) -> int:
    return json.loads((out / "worker0.json").read_text())["steps"]


# --------------------------------------------------------------------------------------------
# Child processes.


def _flat(tree) -> dict[str, np.ndarray]:
    import jax

    return {jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _trained(state) -> dict[str, np.ndarray]:
    return _flat({"params": state.params, "batch_stats": state.batch_stats})


def _start(dtype):
    """A reduced ResNet (one basic block per stage) and SGD, in `dtype`; the float64 state
    holds the float32 state's values, so both runs start from the same point."""
    from flax import nnx

    from resnext_flax import training
    from resnext_flax.models.resnet import ResNet
    from resnext_flax.models.variants import ModelSpec

    model = ResNet(ModelSpec("basic", (1, 1, 1, 1)), num_classes=3, rngs=nnx.Rngs(0))
    tx = training.sgd(0.01, weight_decay=1e-4)
    state = training.create_train_state(model, tx)
    if dtype == np.float64:
        state = in_float64(state, tx)
    return state


def _batches(folder: str, **process):
    from resnext_flax.datasets import load_dataset
    from resnext_flax.metadata import Preprocessing
    from resnext_flax.pipeline import train_loader

    return train_loader(load_dataset(folder), Preprocessing(resize_size=36, crop_size=32),
                        BATCH, epochs=EPOCHS, seed=0, **process)


def _child_reference(folder: str, out: pathlib.Path) -> None:
    """One process, one device, the plain jitted step over the whole global batches."""
    import jax

    from resnext_flax import training

    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_default_matmul_precision", "highest")
    result = {"losses": {}, "indices": []}
    for dtype in (np.float64, np.float32):
        state = _start(dtype)
        if dtype == np.float32:
            np.savez(out / "initial.npz", **_flat({"params": state.params}))
        losses, correct = [], []
        for batch in _batches(folder, process_index=0, process_count=1):
            state, metrics = training.train_step(state, batch["image"].astype(dtype),
                                                 batch["label"])
            losses.append(float(metrics["loss"]))
            correct.append(int(metrics["correct"]))
            if dtype == np.float32:
                result["indices"].append(batch["index"].tolist())
        result["losses"][np.dtype(dtype).name] = losses
        result["correct"] = correct
        np.savez(out / f"reference-{np.dtype(dtype).name}.npz", **_trained(state))
    (out / "reference.json").write_text(json.dumps(result))


def _child_worker(folder: str, out: pathlib.Path) -> None:
    """One of two processes: joins through the RESNEXT_FLAX_* variables, reads its share of
    each global batch, trains over all four devices, checkpoints with Orbax."""
    settings = distributed.initialize(initialization_timeout=int(CHILD_TIMEOUT))
    import jax
    import orbax.checkpoint as ocp

    from resnext_flax import parallel

    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_default_matmul_precision", "highest")
    mesh = parallel.data_mesh()
    step_fn = parallel.make_parallel_train_step(mesh)
    index = jax.process_index()
    result = {"process_index": index, "process_count": jax.process_count(),
              "device_count": jax.device_count(), "local_device_count": jax.local_device_count(),
              "is_main_process": distributed.is_main_process(), "settings": settings.describe(),
              "losses": {}, "indices": []}
    for dtype in (np.float64, np.float32):
        state = parallel.replicate(mesh, parallel.with_batchnorm_axis(_start(dtype)))
        losses, correct = [], []
        for batch in _batches(folder):  # JAX's process index and count
            images, labels = parallel.shard_batch(mesh, batch["image"].astype(dtype),
                                                  batch["label"])
            state, metrics = step_fn(state, images, labels)
            losses.append(float(metrics["loss"]))  # replicated: readable on every process
            correct.append(int(metrics["correct"]))
            if dtype == np.float32:
                result["indices"].append(batch["index"].tolist())
        result["losses"][np.dtype(dtype).name] = losses
        result["correct"], result["steps"] = correct, len(losses)
        if distributed.is_main_process():
            np.savez(out / f"worker-{np.dtype(dtype).name}.npz", **_trained(state))
    try:  # a state that differs between processes cannot be replicated
        parallel.replicate(mesh, {"step": np.int32(0), "w": np.full(3, float(index))})
        result["different_states"] = "replicated"
    except ValueError as err:
        result["different_states"] = str(err)
    # Every process takes part in the checkpoint (Orbax writes each array once).
    manager = ocp.CheckpointManager(out / "checkpoints", item_names=("state", "run"))
    manager.save(len(losses), args=ocp.args.Composite(
        state=ocp.args.StandardSave({"params": state.params}),
        run=ocp.args.JsonSave({"step": len(losses)})))
    manager.wait_until_finished()
    manager.close()
    (out / f"worker{index}.json").write_text(json.dumps(result))
    distributed.shutdown()


if __name__ == "__main__":
    mode, data_folder, out_dir = sys.argv[1], sys.argv[2], pathlib.Path(sys.argv[3])
    (_child_reference if mode == "reference" else _child_worker)(data_folder, out_dir)

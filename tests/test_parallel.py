"""Data parallelism on 8 simulated CPU devices and on two CPU processes.

``--xla_force_host_platform_device_count`` must be set before JAX initializes, so the
checks run in child processes: this file run as a script (``python tests/test_parallel.py
devices|process I PORT``) prints a JSON line of measurements that the tests assert on.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from float64_state import in_float64
from limits import CHILD_TIMEOUT

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# Single device vs 8 devices (or two processes), one SGD step (lr 0.01) of a random resnet18 at
# 8x32x32. The per-device programs reduce in another order than one device does, and this
# random-init model amplifies rounding (see test_training.py), by amounts that depend on the
# CPU's kernels. So the collectives' math is proven in float64 (measured ~1e-15), and float32
# is judged against the float32 floor measured in the same child process: how far the
# single-device float32 step drifts from the single-device float64 step. The parallel float32
# step may drift from float64 by FLOOR_MULTIPLE times that plus FLOOR_ABSOLUTE (the reasoning
# for 4x is in test_training.py; measured here: 0.3x-2x).
FLOAT64_BOUND = 1e-10
FLOOR_MULTIPLE = 4.0
FLOOR_ABSOLUTE = 1e-6


def _assert_within_floor(result: dict, label: str) -> None:
    for kind in ("loss", "params", "batch_stats"):
        assert result["float64"][kind] <= FLOAT64_BOUND, (label, "float64", kind, result)
        error, floor = result["float32"][kind], result["floor"][kind]
        bound = FLOOR_MULTIPLE * floor + FLOOR_ABSOLUTE
        assert error <= bound, (
            f"{label}, {kind}: float32 drift from float64 {error:.2e} > {FLOOR_MULTIPLE:g} x "
            f"single-device float32 floor {floor:.2e} + {FLOOR_ABSOLUTE:g}")


def _run_child(args: list[str], env: dict[str, str], timeout: float) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1])


def _env(devices: int) -> dict[str, str]:
    env = dict(os.environ)
    # Appended, so flags the suite runs under (e.g. --xla_cpu_max_isa) reach the children.
    flags = env.get("XLA_FLAGS", "")
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    return env


@pytest.fixture(scope="module")
def eight_devices() -> dict:
    return _run_child(["devices"], _env(8), timeout=CHILD_TIMEOUT)


def test_data_parallel_training_equals_single_device(eight_devices: dict):
    r = eight_devices
    assert r["device_count"] == 8
    for path in ("gspmd", "shard_map"):
        _assert_within_floor(r[path], path)
        assert r[path]["correct_equal"], path
    assert r["shard_map"]["params_moved"] > 1e-3  # the step did something


def test_a_batch_that_does_not_split_evenly_is_refused(eight_devices: dict):
    message = eight_devices["indivisible"]
    assert "a batch of 7 cannot be split evenly over 8 devices" in message
    assert "multiple of 8" in message


def test_data_parallel_inference_equals_single_device(eight_devices: dict):
    """Eval-mode logits are no chaotic system: float32 rounding of one forward pass."""
    predict = eight_devices["predict"]
    assert predict["float64"] <= FLOAT64_BOUND
    assert predict["float32"] <= FLOOR_MULTIPLE * predict["floor"] + FLOOR_ABSOLUTE, predict
    assert eight_devices["eval_equal"]


def test_grouped_conv_batch_sharding_all_gathers_and_shard_map_does_not(eight_devices: dict):
    """openxla/xla#47945: under batch sharding XLA all-gathers the batch for grouped convs
    (lowered natively); per-device programs keep every device on its own shard."""
    c = eight_devices["collectives"]
    assert c["gspmd_grouped_xla"].get("all-gather", 0) > 0
    assert c["gspmd_dense"].get("all-gather", 0) == 0
    assert c["shard_map_grouped_xla"].get("all-gather", 0) == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_like_one():
    """jax.distributed on localhost with gloo CPU collectives: two processes, one device each,
    run the shard_map step on a global batch; it must equal one process on the whole batch."""
    port = _free_port()
    env = _env(1)
    procs = [subprocess.Popen([sys.executable, __file__, "process", str(i), str(port)],
                              env=env, cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=CHILD_TIMEOUT))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-4000:]
    result = json.loads([ln for ln in outs[0][0].splitlines() if ln.startswith("{")][-1])
    assert result["process_count"] == 2 and result["device_count"] == 2
    _assert_within_floor(result, "two processes")


# --------------------------------------------------------------------------------------------
# Child processes.


def _rel(a, b) -> float:
    import jax
    import numpy as np

    errors = []
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
        errors.append(float(np.linalg.norm(u - v) / max(np.linalg.norm(v), 1e-30)))
    return max(errors)


def _setup(batch: int, dtype):
    """A random resnet18 train state and one batch, in `dtype` (parameters and compute).

    The float64 state holds the float32 state's values (the children run with
    jax_enable_x64, so float64 is real), so both start from the same point."""
    import jax
    import numpy as np

    import resnext_flax
    from resnext_flax import training

    jax.config.update("jax_default_matmul_precision", "highest")
    model = resnext_flax.create_model("resnet18", num_classes=10)
    tx = training.sgd(0.01, weight_decay=1e-4)
    state = training.create_train_state(model, tx)
    if dtype == np.float64:
        state = in_float64(state, tx)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 32, 32, 3)).astype(dtype)
    y = rng.integers(0, 10, batch).astype(np.int32)
    return state, x, y


def _step_errors(new, metrics, exact, exact_metrics) -> dict:
    loss = float(np.asarray(metrics["loss"]))
    exact_loss = float(exact_metrics["loss"])
    return {"loss": abs(loss - exact_loss) / exact_loss,
            "params": _rel(new.params, exact.params),
            "batch_stats": _rel(new.batch_stats, exact.batch_stats)}


def _drifts(runs: dict, single: dict) -> dict:
    """Errors of one parallel path's steps (`runs`, by dtype) against the single-device
    float64 step, and the float32 floor (single-device float32 against float64)."""
    exact = single[np.float64]
    return {"float64": _step_errors(*runs[np.float64], *exact),
            "float32": _step_errors(*runs[np.float32], *exact),
            "floor": _step_errors(*single[np.float32], *exact)}


def _child_devices() -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from resnext_flax import parallel, training
    from resnext_flax.nn.layers import Conv
    from resnext_flax.nn.policy import XLA_POLICY

    jax.config.update("jax_enable_x64", True)
    mesh = parallel.data_mesh()
    single = {dtype: training.train_step(*_setup(8, dtype)) for dtype in (np.float64,
                                                                          np.float32)}
    out = {"device_count": jax.device_count()}

    def gspmd(dtype):
        state, x, y = _setup(8, dtype)
        return training.train_step(parallel.replicate(mesh, state),
                                   *parallel.shard_batch(mesh, x, y))

    def per_device(dtype):
        state, x, y = _setup(8, dtype)
        pstate = parallel.replicate(mesh, parallel.with_batchnorm_axis(state))
        return parallel.make_parallel_train_step(mesh)(pstate, *parallel.shard_batch(mesh, x, y))

    for name, run in (("gspmd", gspmd), ("shard_map", per_device)):
        runs = {dtype: run(dtype) for dtype in (np.float64, np.float32)}
        out[name] = _drifts(runs, single)
        out[name]["correct_equal"] = (int(runs[np.float32][1]["correct"])
                                      == int(single[np.float32][1]["correct"]))
        out[name]["params_moved"] = _rel(runs[np.float32][0].params["conv1"],
                                         _setup(8, np.float32)[0].params["conv1"])

    logits = {}
    for dtype in (np.float64, np.float32):
        state, x, y = _setup(8, dtype)
        pstate = parallel.replicate(mesh, parallel.with_batchnorm_axis(state))
        xs, ys = parallel.shard_batch(mesh, x, y)
        logits[dtype] = (parallel.make_parallel_predict(mesh)(pstate, xs),
                         training.predict(state, x))
        if dtype == np.float32:
            ev = parallel.make_parallel_eval_step(mesh)(pstate, xs, ys)
            ev1 = training.eval_step(state, x, y)
            out["eval_equal"] = int(ev["correct"]) == int(ev1["correct"])
    exact = logits[np.float64][1]
    out["predict"] = {"float64": _rel(logits[np.float64][0], exact),
                      "float32": _rel(logits[np.float32][0], exact),
                      "floor": _rel(logits[np.float32][1], exact)}

    # A ResNeXt-50 stage-2 grouped 3x3 conv (32 groups of 4) and a dense one, under batch
    # sharding (GSPMD) and per device (shard_map), lowered as XLA's native convolution.
    def conv_collectives(groups: int, use_shard_map: bool) -> dict:
        conv = Conv(128, 128, 3, padding=1, groups=groups, policy=XLA_POLICY, rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(conv)

        def f(params, images):
            return nnx.merge(graphdef, params)(images)

        if use_shard_map:
            from jax.sharding import PartitionSpec as P

            f = jax.shard_map(f, mesh=mesh, in_specs=(P(), P("data")), out_specs=P("data"))
        images = parallel.shard_batch(mesh, jnp.zeros((8, 16, 16, 128), jnp.float32))
        return parallel.collectives(jax.jit(f), parallel.replicate(mesh, params), images)

    try:
        parallel.shard_batch(mesh, np.zeros((7, 2), np.float32))
        out["indivisible"] = "no error"
    except ValueError as err:
        out["indivisible"] = str(err)

    out["collectives"] = {
        "gspmd_grouped_xla": conv_collectives(32, False),
        "gspmd_dense": conv_collectives(1, False),
        "shard_map_grouped_xla": conv_collectives(32, True),
    }
    return out


def _child_process(index: int, port: int) -> dict:
    import jax

    from resnext_flax import distributed, parallel, training

    # Explicit settings; the library picks the CPU collectives (gloo) before the backend starts.
    distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=index,
                           initialization_timeout=int(CHILD_TIMEOUT))
    jax.config.update("jax_enable_x64", True)

    mesh = parallel.data_mesh()
    local_device = jax.local_devices()[0]
    single = {dtype: training.train_step(*jax.device_put(_setup(8, dtype), local_device))
              for dtype in (np.float64, np.float32)}

    def two_processes(dtype):
        state, x, y = _setup(8, dtype)
        local = slice(4 * index, 4 * index + 4)  # each process feeds its half of the batch
        xs, ys = parallel.shard_batch(mesh, x[local], y[local])
        pstate = parallel.replicate(mesh, parallel.with_batchnorm_axis(state))
        new, metrics = parallel.make_parallel_train_step(mesh)(pstate, xs, ys)
        return (jax.tree.map(lambda a: a.addressable_data(0), new),
                jax.tree.map(lambda a: a.addressable_data(0), metrics))

    result = {"process_count": jax.process_count(), "device_count": jax.device_count(),
              **_drifts({dtype: two_processes(dtype) for dtype in (np.float64, np.float32)},
                        single)}
    distributed.shutdown()
    return result


if __name__ == "__main__":
    mode = sys.argv[1]
    result = (_child_devices() if mode == "devices"
              else _child_process(int(sys.argv[2]), int(sys.argv[3])))
    print(json.dumps(result))

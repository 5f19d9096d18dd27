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

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# Single device vs 8 devices, one SGD step (lr 0.01) of a random resnet18 at 8x32x32: the
# per-device programs reduce in a different order, and this random-init model amplifies
# rounding (see test_training.py); measured: parameters 8.6e-6, running statistics 1.1e-6,
# loss 2e-7, eval logits 7e-7 (relative).
PARAM_BOUND = 5e-5
STAT_BOUND = 1e-5
LOGIT_BOUND = 1e-5


def _run_child(args: list[str], env: dict[str, str], timeout: float) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1])


def _env(devices: int) -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    return env


@pytest.fixture(scope="module")
def eight_devices() -> dict:
    return _run_child(["devices"], _env(8), timeout=300)


def test_data_parallel_training_equals_single_device(eight_devices: dict):
    r = eight_devices
    assert r["device_count"] == 8
    for path in ("gspmd", "shard_map"):
        assert r[path]["loss"] < 1e-5, path
        assert r[path]["params"] < PARAM_BOUND, path
        assert r[path]["batch_stats"] < STAT_BOUND, path
        assert r[path]["correct_equal"], path
    assert r["shard_map"]["params_moved"] > 100 * PARAM_BOUND  # the step did something


def test_data_parallel_inference_equals_single_device(eight_devices: dict):
    assert eight_devices["predict"] < LOGIT_BOUND
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
            outs.append(p.communicate(timeout=240))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-4000:]
    result = json.loads([ln for ln in outs[0][0].splitlines() if ln.startswith("{")][-1])
    assert result["process_count"] == 2 and result["device_count"] == 2
    assert result["loss"] < 1e-5
    assert result["params"] < PARAM_BOUND
    assert result["batch_stats"] < STAT_BOUND


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


def _setup(batch: int):
    import jax
    import numpy as np

    import resnext_flax
    from resnext_flax import training

    jax.config.update("jax_default_matmul_precision", "highest")
    model = resnext_flax.create_model("resnet18", num_classes=10)
    state = training.create_train_state(model, training.sgd(0.01, weight_decay=1e-4))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 32, 32, 3)).astype(np.float32)
    y = rng.integers(0, 10, batch).astype(np.int32)
    return state, x, y


def _child_devices() -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from resnext_flax import ops, parallel, training
    from resnext_flax.layers import Conv

    state, x, y = _setup(8)
    single, m1 = training.train_step(state, x, y)
    mesh = parallel.data_mesh()
    xs, ys = parallel.shard_batch(mesh, x, y)
    out = {"device_count": jax.device_count()}

    def compare(new, metrics):
        return {"loss": abs(float(metrics["loss"]) - float(m1["loss"])) / float(m1["loss"]),
                "params": _rel(new.params, single.params),
                "batch_stats": _rel(new.batch_stats, single.batch_stats),
                "correct_equal": int(metrics["correct"]) == int(m1["correct"]),
                "params_moved": _rel(new.params, state.params)}

    out["gspmd"] = compare(*training.train_step(parallel.replicate(mesh, state), xs, ys))
    pstate = parallel.replicate(mesh, parallel.with_batchnorm_axis(state))
    out["shard_map"] = compare(*parallel.make_parallel_train_step(mesh)(pstate, xs, ys))
    logits = parallel.make_parallel_predict(mesh)(pstate, xs)
    out["predict"] = _rel(logits, training.predict(state, x))
    ev = parallel.make_parallel_eval_step(mesh)(pstate, xs, ys)
    ev1 = training.eval_step(state, x, y)
    out["eval_equal"] = int(ev["correct"]) == int(ev1["correct"])

    # A ResNeXt-50 stage-2 grouped 3x3 conv (32 groups of 4) and a dense one, under batch
    # sharding (GSPMD) and per device (shard_map), lowered as XLA's native convolution.
    def conv_collectives(groups: int, use_shard_map: bool) -> dict:
        conv = Conv(128, 128, 3, padding=1, groups=groups, rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(conv)

        def f(params, images):
            return nnx.merge(graphdef, params)(images)

        if use_shard_map:
            from jax.sharding import PartitionSpec as P

            f = jax.shard_map(f, mesh=mesh, in_specs=(P(), P("data")), out_specs=P("data"))
        images = parallel.shard_batch(mesh, jnp.zeros((8, 16, 16, 128), jnp.float32))
        with ops.conv_lowering("xla"):
            return parallel.collectives(jax.jit(f), parallel.replicate(mesh, params), images)

    out["collectives"] = {
        "gspmd_grouped_xla": conv_collectives(32, False),
        "gspmd_dense": conv_collectives(1, False),
        "shard_map_grouped_xla": conv_collectives(32, True),
    }
    return out


def _child_process(index: int, port: int) -> dict:
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=index,
                               initialization_timeout=60)
    from resnext_flax import parallel, training

    state, x, y = _setup(8)
    mesh = parallel.data_mesh()
    local = slice(4 * index, 4 * index + 4)  # each process feeds its half of the batch
    xs, ys = parallel.shard_batch(mesh, x[local], y[local])
    pstate = parallel.replicate(mesh, parallel.with_batchnorm_axis(state))
    new, metrics = parallel.make_parallel_train_step(mesh)(pstate, xs, ys)
    local = jax.local_devices()[0]
    single, m1 = training.train_step(*jax.device_put((state, x, y), local))
    new = jax.tree.map(lambda a: a.addressable_data(0), new)
    result = {"process_count": jax.process_count(), "device_count": jax.device_count(),
              "loss": abs(float(metrics["loss"].addressable_data(0)) - float(m1["loss"]))
              / float(m1["loss"]),
              "params": _rel(new.params, single.params),
              "batch_stats": _rel(new.batch_stats, single.batch_stats)}
    jax.distributed.shutdown()
    return result


if __name__ == "__main__":
    mode = sys.argv[1]
    result = (_child_devices() if mode == "devices"
              else _child_process(int(sys.argv[2]), int(sys.argv[3])))
    print(json.dumps(result))

"""Many processes (hosts, or one process per accelerator) through ``jax.distributed``.

Every process runs the same program; :func:`initialize` connects them before JAX starts its
backend. Where the settings come from, first found wins per setting:

1. the arguments (a command's ``--coordinator`` ... flags);
2. this library's environment variables (:data:`ENV_VARS`), then JAX's own
   ``JAX_COORDINATOR_ADDRESS`` and ``JAX_LOCAL_DEVICE_IDS``;
3. the launcher, as ``jax.distributed.initialize`` itself detects it: SLURM (``srun``),
   Open MPI (``mpirun``), Cloud TPU VMs, Kubernetes. ``JAX_COORDINATOR_PORT`` overrides the
   port JAX derives there.

Nothing found, or one process in all, is a single-process run and :func:`initialize` does
nothing (``local_device_ids`` alone does not make a run multi-process). Some of the
required settings without the rest and no launcher to complete them is an error: a
process that silently trained alone would compute another model.

After :func:`initialize`, ``jax.devices()`` lists the devices of every process: a
:func:`resnext_flax.parallel.data_mesh` spans them all, the input pipeline reads this
process's share of each global batch (``pipeline.train_loader`` takes JAX's process index
and count by default), :func:`resnext_flax.parallel.shard_batch` assembles the global batch,
and the data-parallel steps reduce loss, gradients, BatchNorm statistics and metrics over
every device of every process.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Sequence
from typing import Any

#: The library's environment variables, by setting.
ENV_VARS = {
    "coordinator_address": "RESNEXT_FLAX_COORDINATOR",
    "num_processes": "RESNEXT_FLAX_NUM_PROCESSES",
    "process_id": "RESNEXT_FLAX_PROCESS_ID",
    "local_device_ids": "RESNEXT_FLAX_LOCAL_DEVICE_IDS",
}
#: JAX's own variables for the same settings (``jax.distributed.initialize`` reads them).
JAX_ENV_VARS = {
    "coordinator_address": "JAX_COORDINATOR_ADDRESS",
    "local_device_ids": "JAX_LOCAL_DEVICE_IDS",
}
#: The settings every process needs; ``local_device_ids`` is optional.
REQUIRED = ("coordinator_address", "num_processes", "process_id")


@dataclasses.dataclass(frozen=True)
class DistributedSettings:
    """How this process joins the run.

    - `coordinator_address`: ``host:port`` of process 0's coordinator (None: one process).
    - `num_processes`, `process_id`: the run's size and this process's index in it.
    - `local_device_ids`: the accelerators this process uses (None: JAX's default, which is
      one device per process under SLURM and Open MPI on GPUs and every device otherwise).
    - `source`: where each setting came from, for the run's printed configuration.
    """

    coordinator_address: str | None
    num_processes: int
    process_id: int
    local_device_ids: tuple[int, ...] | None = None
    source: str = "single process"

    @property
    def multi_process(self) -> bool:
        return self.num_processes > 1

    def describe(self) -> str:
        """One line for a run's printed configuration."""
        if not self.multi_process:
            return "single process"
        parts = [f"process {self.process_id} of {self.num_processes}"]
        if self.coordinator_address is not None:
            parts.append(f"coordinator {self.coordinator_address}")
        if self.local_device_ids is not None:
            parts.append(f"local devices {','.join(map(str, self.local_device_ids))}")
        return f"{', '.join(parts)} (from {self.source})"


SINGLE_PROCESS = DistributedSettings(None, 1, 0)


def _parse_int(value: Any, name: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if isinstance(value, int):
        return value
    try:
        return int(str(value).strip())
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def _parse_device_ids(value: Any, name: str) -> tuple[int, ...]:
    items = value.split(",") if isinstance(value, str) else (
        [value] if isinstance(value, int) else list(value))
    ids = tuple(_parse_int(item, name) for item in items)
    if not ids or any(i < 0 for i in ids):
        raise ValueError(f"{name} must be device ids >= 0 (e.g. '0,1,2,3'), got {value!r}")
    return ids


def _check_address(address: Any, name: str) -> str:
    host, sep, port = str(address).strip().rpartition(":")
    if not (isinstance(address, str) and sep and host and port.isdigit()
            and 0 < int(port) < 65536):
        raise ValueError(f"{name} must be 'host:port' (the address of process 0 and a free "
                         f"port there, e.g. '10.0.0.1:1234'), got {address!r}")
    return address.strip()


def _given(arguments: dict[str, Any]) -> dict[str, tuple[Any, str]]:
    """Each setting given by an argument or an environment variable, with its origin."""
    found = {}
    for key, value in arguments.items():
        if value is not None:
            found[key] = (value, "arguments")
            continue
        for table in (ENV_VARS, JAX_ENV_VARS):
            var = table.get(key)
            if var and os.environ.get(var, "").strip():
                found[key] = (os.environ[var], var)
                break
    return found


def detected_launcher() -> Any:
    """The cluster environment ``jax.distributed.initialize`` would detect (JAX's own
    ``ClusterEnv`` classes, in JAX's order; the opt-in ones such as mpi4py are left out, as
    JAX does), or None."""
    try:
        from jax._src import clusters
    except ImportError:  # pragma: no cover - a JAX without the module: no detection
        return None
    for env in getattr(clusters.ClusterEnv, "_cluster_types", ()):
        if not env.opt_in_only_method and env.is_env_present():
            return env
    return None


def resolve(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | str | None = None,
    *,
    initialization_timeout: int = 300,
) -> DistributedSettings:
    """The settings :func:`initialize` would use, from the arguments, the environment and
    the launcher (see the module's docstring); starts nothing. `initialization_timeout`
    bounds the wait of launchers whose coordinator is looked up (Cloud TPU).

    Raises ValueError for malformed values and for some settings given without the others
    when no launcher supplies the rest.
    """
    given = _given({"coordinator_address": coordinator_address,
                    "num_processes": num_processes, "process_id": process_id,
                    "local_device_ids": local_device_ids})
    values = {key: value for key, (value, _) in given.items()}
    origins = {key: origin for key, (_, origin) in given.items()}
    missing = [key for key in REQUIRED if key not in values]
    launcher = detected_launcher() if missing else None
    if launcher is not None:
        for key in missing:
            origins[key] = f"{launcher.name} (detected by jax)"
        if "num_processes" in missing:
            values["num_processes"] = launcher.get_process_count()
        if "process_id" in missing:
            values["process_id"] = launcher.get_process_id()
        if "coordinator_address" in missing:
            values["coordinator_address"] = launcher.get_coordinator_address(
                timeout_secs=initialization_timeout,
                override_coordinator_port=os.environ.get("JAX_COORDINATOR_PORT") or None)
        missing = []
    if launcher is None and len(missing) == len(REQUIRED):
        return SINGLE_PROCESS  # local_device_ids alone only matter to a multi-process run
    if missing:
        have = ", ".join(f"{key} (from {origins[key]})" for key in values)
        how = "; ".join(f"{key}: argument or {ENV_VARS[key]}" for key in missing)
        raise ValueError(
            f"a multi-process run needs {', '.join(REQUIRED)}; got {have} but not "
            f"{', '.join(missing)}, and no launcher (SLURM, Open MPI, Cloud TPU) was detected "
            f"to supply them. Give {how}; or give none of them for a single process")

    def name(key: str) -> str:
        origin = origins[key]
        return key if origin == "arguments" or "detected" in origin else origin

    count = _parse_int(values["num_processes"], name("num_processes"))
    index = _parse_int(values["process_id"], name("process_id"))
    if count < 1:
        raise ValueError(f"{name('num_processes')} must be at least 1, got {count}")
    if not 0 <= index < count:
        raise ValueError(f"{name('process_id')} must be from 0 to {count - 1} "
                         f"({name('num_processes')} is {count}), got {index}")
    address = _check_address(values["coordinator_address"], name("coordinator_address"))
    devices = values.get("local_device_ids")
    devices = None if devices is None else _parse_device_ids(devices, name("local_device_ids"))
    sources = sorted(set(origins.values()), key=list(origins.values()).index)
    return DistributedSettings(address, count, index, devices, ", ".join(sources))


def _use_cpu_collectives() -> None:
    """Cross-process collectives on CPU need an implementation chosen before the backend
    starts; without one the CPU backend has nothing to reduce across processes with. Gloo
    (TCP) ships with jaxlib; a choice already made (e.g. ``mpi``) is kept."""
    import jax

    if jax.config.jax_cpu_collectives_implementation is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | str | None = None,
    *,
    initialization_timeout: int = 300,
) -> DistributedSettings:
    """Join the multi-process run described by the arguments, the environment or the
    launcher (:func:`resolve`); a no-op for a single process and when
    ``jax.distributed`` is already initialized. Call it first, before anything that starts
    JAX's backend (creating a model, ``jax.devices()``).

    `initialization_timeout`: seconds to wait for every process to connect.
    """
    import jax

    if jax.distributed.is_initialized():
        return DistributedSettings(None, jax.process_count(), jax.process_index(),
                                   source="jax.distributed, initialized before")
    settings = resolve(coordinator_address, num_processes, process_id, local_device_ids,
                       initialization_timeout=initialization_timeout)
    if not settings.multi_process:
        return settings
    _use_cpu_collectives()
    jax.distributed.initialize(
        settings.coordinator_address, settings.num_processes, settings.process_id,
        None if settings.local_device_ids is None else list(settings.local_device_ids),
        initialization_timeout=initialization_timeout)
    return settings


def shutdown() -> None:
    """Disconnect from the run (waits for the other processes); a no-op when not joined."""
    import jax

    jax.distributed.shutdown()


def is_main_process() -> bool:
    """True on process 0, the one that writes logs, plots and exported models. Orbax
    checkpoints are saved by every process together (Orbax spreads the array writes over
    the processes and writes the metadata from process 0): every process calls the
    checkpoint manager, on a directory they all see."""
    import jax

    return jax.process_index() == 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command-line flags of :func:`initialize`'s settings, in their own help group
    (``--coordinator``, ``--num-processes``, ``--process-id``, ``--local-device-ids``);
    read them back with :func:`initialize_from_arguments`. Building the parser imports
    nothing heavy."""
    group = parser.add_argument_group(
        "many hosts", "jax.distributed settings; unset ones come from the environment "
        f"({', '.join(ENV_VARS.values())}) or the launcher (SLURM, Open MPI, Cloud TPU); "
        "none at all: one process")
    group.add_argument("--coordinator", metavar="HOST:PORT",
                       help="address of process 0 and a free port there")
    group.add_argument("--num-processes", type=int, metavar="N", help="processes in all")
    group.add_argument("--process-id", type=int, metavar="I",
                       help="this process's index, from 0")
    group.add_argument("--local-device-ids", metavar="IDS",
                       help="comma-separated accelerators this process drives (default: "
                            "JAX's, one GPU per process under SLURM and Open MPI)")


def initialize_from_arguments(args: argparse.Namespace, **kwargs: Any) -> DistributedSettings:
    """:func:`initialize` with the flags of :func:`add_arguments`."""
    return initialize(args.coordinator, args.num_processes, args.process_id,
                      args.local_device_ids, **kwargs)

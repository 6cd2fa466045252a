"""Several processes of one run on JAX's own multi-controller runtime (`jax.distributed`).

One command per host starts one process; `initialize` connects them through JAX's
coordination service (the coordinator is process 0's address). The run's stages use
`Processes` for who does what and to wait for each other (`barrier`, the coordination
service's barrier): nothing of our own coordinates, and every result goes through the run
folder, which all processes must share (a shared filesystem across hosts).

    mgd run --preset demo --coordinator host0:12345 --num-processes 2 --process-id 0   # host 0
    mgd run --preset demo --coordinator host0:12345 --num-processes 2 --process-id 1   # host 1

or the same variables JAX reads (JAX_COORDINATOR_ADDRESS, with JAX_NUM_PROCESSES and
JAX_PROCESS_ID), or `--distributed` alone under SLURM (or Open MPI), whose environment JAX
detects. docs/planner.md has the details.
"""
from __future__ import annotations

import itertools
import logging
import os
from dataclasses import dataclass

import jax

__all__ = ["Processes", "current", "initialize", "from_env", "BARRIER_TIMEOUT_S"]

log = logging.getLogger(__name__)

# How long a process waits for the others at a barrier: they may be training the base
# model or labeling their share of the rounds meanwhile.
BARRIER_TIMEOUT_S = float(os.environ.get("MGD_BARRIER_TIMEOUT_S", 48 * 3600))

_barrier_ids = itertools.count()


@dataclass(frozen=True)
class Processes:
    """This process's place among the run's processes."""
    index: int = 0
    count: int = 1

    @property
    def is_first(self) -> bool:
        return self.index == 0

    def rounds(self, n: int) -> list[int]:
        """The rounds this process labels of `n`: index, index + count, ..."""
        return list(range(self.index, n, self.count))

    def barrier(self, name: str, timeout_s: float | None = None) -> None:
        """Wait until every process has reached the barrier `name` (no-op alone)."""
        if self.count == 1:
            return
        if not jax.distributed.is_initialized():
            raise RuntimeError("several processes but jax.distributed is not initialized")
        timeout_ms = int(1000 * (BARRIER_TIMEOUT_S if timeout_s is None else timeout_s))
        # Barrier ids must be unique within the runtime's life: every process calls the
        # same barriers in the same order, so a shared counter keeps them in step.
        barrier_id = f"mgd/{next(_barrier_ids)}/{name}"
        log.info(f"process {self.index}: waiting for the other processes ({name})")
        client = _coordination_client()
        if client is None:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(barrier_id)
        else:
            client.wait_at_barrier(barrier_id, min(timeout_ms, 2**31 - 1))


def _coordination_client():
    """The coordination service's client, or None where this JAX no longer exposes it.

    JAX's only public barrier (`multihost_utils.sync_global_devices`) is a device collective
    with no timeout, unfit for waits of hours (another process training the base model), so
    the service's own barrier is preferred; the collective is the fallback."""
    try:
        from jax._src import distributed as _dist
        client = _dist.global_state.client
    except (ImportError, AttributeError):
        return None
    return client if hasattr(client, "wait_at_barrier") else None


def current() -> Processes:
    """The processes of the JAX runtime (one when `jax.distributed` is not initialized)."""
    return Processes(jax.process_index(), jax.process_count())


def from_env(env=None) -> dict:
    """The launch settings in the environment: JAX_COORDINATOR_ADDRESS (which JAX reads
    itself), JAX_NUM_PROCESSES and JAX_PROCESS_ID; {} when none is set."""
    env = os.environ if env is None else env
    out = {}
    if env.get("JAX_COORDINATOR_ADDRESS"):
        out["coordinator"] = env["JAX_COORDINATOR_ADDRESS"]
    for key, name in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
        if env.get(key):
            try:
                out[name] = int(env[key])
            except ValueError:
                raise ValueError(f"{key}={env[key]!r} is not an integer") from None
    return out


def _check(coordinator, num_processes, process_id) -> None:
    if coordinator is not None:
        host, sep, port = str(coordinator).rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"--coordinator {coordinator}: expected HOST:PORT, as host0:12345")
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"--num-processes must be >= 1, got {num_processes}")
    if process_id is not None and process_id < 0:
        raise ValueError(f"--process-id must be >= 0, got {process_id}")
    if None not in (num_processes, process_id) and process_id >= num_processes:
        raise ValueError(f"--process-id {process_id} must be below --num-processes "
                         f"{num_processes}")


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, detect: bool = False) -> Processes:
    """Connect this process to the run's others; ValueError for settings that cannot work.

    The arguments, else the environment (`from_env`); with `detect`, what is still unset
    comes from JAX's cluster detection (SLURM, Open MPI, ...). One process in all
    initializes nothing."""
    env = from_env()
    coordinator = coordinator or env.get("coordinator")
    num_processes = num_processes if num_processes is not None else env.get("num_processes")
    process_id = process_id if process_id is not None else env.get("process_id")
    _check(coordinator, num_processes, process_id)
    if num_processes == 1:
        return Processes()
    if not detect and None in (coordinator, num_processes, process_id):
        missing = [flag for flag, v in (("--coordinator", coordinator),
                                        ("--num-processes", num_processes),
                                        ("--process-id", process_id)) if v is None]
        raise ValueError(f"{', '.join(missing)}: needed to run several processes (or pass "
                         "--distributed to take them from SLURM or Open MPI)")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)
    procs = current()
    log.info(f"process {procs.index} of {procs.count} connected "
             f"({len(jax.local_devices())} local devices, {len(jax.devices())} in all)")
    return procs

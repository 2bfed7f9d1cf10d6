"""Multi-host runs on JAX's own engine: ``jax.distributed.initialize``, and results gathered to every host.

Every process runs the same program (same model, same request). After ``initialize`` ``jax.devices()`` lists
the devices of all processes, so one mesh spans them; each process loads only the parameter shards its own
devices hold, and only process 0 writes files.

* Cloud TPU pod slices (and clusters JAX detects itself: Slurm, Open MPI, ...): ``initialize(auto=True)``, or
  ``FASTVIDEO_JAX_DISTRIBUTED=auto`` for the CLI / ``VideoGenerator``.
* Elsewhere: ``initialize("host0:1234", num_processes=2, process_id=0)``, or the environment
  ``FASTVIDEO_JAX_COORDINATOR=host0:1234 FASTVIDEO_JAX_NUM_PROCESSES=2 FASTVIDEO_JAX_PROCESS_ID=0`` (and
  optionally ``FASTVIDEO_JAX_LOCAL_DEVICE_IDS=0,1``). CPU processes talk through JAX's CPU collectives (gloo).

It must run before anything touches a JAX backend (the first ``jax.devices()`` or array).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence

import jax
import numpy as np

from fastvideo_jax.errors import UserError

__all__ = ["ENV_COORDINATOR", "ENV_MODE", "ENV_NUM_PROCESSES", "ENV_PROCESS_ID", "initialize", "initialize_from_env",
           "is_primary", "to_host"]

log = logging.getLogger(__name__)

ENV_MODE = "FASTVIDEO_JAX_DISTRIBUTED"  # "auto": let JAX detect the cluster (TPU pods, Slurm, ...)
ENV_COORDINATOR = "FASTVIDEO_JAX_COORDINATOR"  # host:port of process 0's coordinator service
ENV_NUM_PROCESSES = "FASTVIDEO_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "FASTVIDEO_JAX_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "FASTVIDEO_JAX_LOCAL_DEVICE_IDS"


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids: Sequence[int] | None = None, *,
               auto: bool = False) -> bool:
    """Join a multi-process run: ``auto`` lets JAX find the cluster (TPU pods), otherwise all three of
    coordinator, process count and id are needed. Returns False when already initialized (a repeated call is
    harmless); ``UserError`` names a missing or bad value, or a backend started too early."""
    if jax.distributed.is_initialized():
        return False
    if not auto:
        _check(coordinator_address, num_processes, process_id)
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id, local_device_ids)
    except RuntimeError as e:
        raise UserError(f"multi-host initialize failed: {e} (call it before any JAX computation)") from e
    log.info("process %d of %d; %d local devices of %d", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())
    return True


def initialize_from_env(env: Mapping[str, str] | None = None) -> bool:
    """``initialize`` from ``FASTVIDEO_JAX_*`` variables; False (single process) when none is set."""
    env = os.environ if env is None else env
    mode = env.get(ENV_MODE, "").strip().lower()
    if mode not in ("", "auto"):
        raise UserError(f"{ENV_MODE}={env[ENV_MODE]!r}: the only value is 'auto' (or set {ENV_COORDINATOR}, "
                        f"{ENV_NUM_PROCESSES} and {ENV_PROCESS_ID})")
    if mode == "auto":
        return initialize(auto=True)
    if not any(k in env for k in (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID)):
        return False
    ids = env.get(ENV_LOCAL_DEVICE_IDS)
    return initialize(env.get(ENV_COORDINATOR), _env_int(env, ENV_NUM_PROCESSES), _env_int(env, ENV_PROCESS_ID),
                      [int(i) for i in ids.split(",")] if ids else None)


def _env_int(env: Mapping[str, str], name: str) -> int | None:
    if name not in env:
        return None
    try:
        return int(env[name])
    except ValueError:
        raise UserError(f"{name}={env[name]!r} is not an integer") from None


def _check(coordinator: str | None, num_processes: int | None, process_id: int | None) -> None:
    missing = [n for n, v in ((ENV_COORDINATOR, coordinator), (ENV_NUM_PROCESSES, num_processes),
                              (ENV_PROCESS_ID, process_id)) if v is None]
    if missing:
        raise UserError(f"multi-host needs a coordinator address, a process count and a process id; missing "
                        f"{', '.join(missing)} (or use auto detection on TPU pods: {ENV_MODE}=auto)")
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"{ENV_COORDINATOR}={coordinator!r}: expected host:port")
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise UserError(f"process id {process_id} is not in [0, {num_processes}) ({ENV_PROCESS_ID}, "
                        f"{ENV_NUM_PROCESSES})")


def is_primary() -> bool:
    """Whether this is process 0, the one that writes files."""
    return jax.process_index() == 0


def to_host(x: jax.Array) -> np.ndarray:
    """The whole of a (possibly multi-host) array as numpy on this host: the local copy when this process holds
    it all, else gathered from every process (all processes must call this together)."""
    if x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))

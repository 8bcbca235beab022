"""Where this process sits in a job: rank, local rank, world size and the shared run id.

Order of sources (first usable one wins, like Lightning's ``_get_rank``):

* rank / world size: ``torch.distributed`` when it is initialised, then ``RANK`` /
  ``WORLD_SIZE`` (torchrun), ``SLURM_PROCID`` / ``SLURM_NTASKS``, ``OMPI_COMM_WORLD_RANK`` /
  ``OMPI_COMM_WORLD_SIZE``, else 0 / 1;
* local rank: ``LOCAL_RANK``, ``SLURM_LOCALID``, ``OMPI_COMM_WORLD_LOCAL_RANK``, else 0;
* run id (see :func:`detect_run_id`): ``OTEL_ML_RUN_ID``, ``TORCHELASTIC_RUN_ID``, SLURM job and
  step ids, a digest of the rendezvous variables, else a fresh time-based id.

Nothing here runs a collective: every rank derives the same run id from variables the
launcher gave all of them.

Example::

    >>> info = detect({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "OTEL_ML_RUN_ID": "exp7"})
    >>> (info.rank, info.local_rank, info.world_size, info.run_id)
    (3, 1, 8, 'exp7')
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

from otel_ml import names
from otel_ml._logging import warn_once

RANK_VARS = ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK")
LOCAL_RANK_VARS = ("LOCAL_RANK", "SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK")
WORLD_SIZE_VARS = ("WORLD_SIZE", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


@dataclass(frozen=True)
class RankInfo:
    """Rank, local rank, world size and run id of this process.

    Example::

        info = RankInfo(rank=0, local_rank=0, world_size=1, run_id="exp7")
    """

    rank: int
    local_rank: int
    world_size: int
    run_id: str


def _int_from(env: Mapping[str, str], variables: tuple[str, ...], minimum: int) -> int | None:
    for var in variables:
        raw = env.get(var)
        if raw is None or raw.strip() == "":
            continue
        try:
            value = int(raw.strip())
        except ValueError:
            warn_once(f"env:{var}", "otel_ml: ignoring %s=%r: not an integer", var, raw)
            continue
        if value < minimum:
            warn_once(f"env:{var}", "otel_ml: ignoring %s=%r: below %d", var, raw, minimum)
            continue
        return value
    return None


def _torch_distributed() -> tuple[int, int] | None:
    """(rank, world size) from torch.distributed, without importing torch if it is not loaded."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except Exception:  # noqa: BLE001 - a broken torch must not stop training
        return None
    return None


def detect_run_id(env: Mapping[str, str]) -> str:
    """The run id all ranks of one job agree on, without talking to each other.

    1. ``OTEL_ML_RUN_ID``;
    2. ``TORCHELASTIC_RUN_ID`` (set by torchrun; its default ``none`` is ignored);
    3. ``slurm-<SLURM_JOB_ID>[.<SLURM_STEP_ID>]``;
    4. ``job-<digest>`` of ``MASTER_ADDR``, ``MASTER_PORT`` and ``WORLD_SIZE`` when a rendezvous is
       configured (stable for the job; set ``OTEL_ML_RUN_ID`` to tell reruns apart);
    5. a new ``<UTC time>-<random>`` id for a single process.
    """
    explicit = env.get("OTEL_ML_RUN_ID", "").strip()
    if explicit:
        return names.run_id(explicit)
    elastic = env.get("TORCHELASTIC_RUN_ID", "").strip()
    if elastic and elastic.lower() != "none":
        return names.run_id(elastic)
    slurm_job = env.get("SLURM_JOB_ID", "").strip()
    if slurm_job:
        step = env.get("SLURM_STEP_ID", "").strip()
        return names.run_id(f"slurm-{slurm_job}" + (f".{step}" if step else ""))
    addr, port = env.get("MASTER_ADDR", "").strip(), env.get("MASTER_PORT", "").strip()
    if addr and port:
        key = f"{addr}:{port}:{env.get('WORLD_SIZE', '')}"
        return "job-" + hashlib.sha1(key.encode()).hexdigest()[:12]
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return f"{stamp}-{uuid.uuid4().hex[:6]}"


def rank_from_env(env: Mapping[str, str] | None = None) -> int:
    """The global rank from the launcher's variables only (``RANK``, ``SLURM_PROCID``, ...)."""
    return _int_from(os.environ if env is None else env, RANK_VARS, 0) or 0


def detect(env: Mapping[str, str] | None = None) -> RankInfo:
    """Detect rank, local rank, world size and run id (see module docstring for the order)."""
    env = os.environ if env is None else env
    from_torch = _torch_distributed()
    if from_torch is not None:
        rank, world_size = from_torch
    else:
        rank = rank_from_env(env)
        world_size = _int_from(env, WORLD_SIZE_VARS, 1) or 1
    local_rank = _int_from(env, LOCAL_RANK_VARS, 0) or 0
    if world_size <= rank:
        warn_once(
            "rank>=world",
            "otel_ml: rank %d is not below world size %d; using world size %d",
            rank,
            world_size,
            rank + 1,
        )
        world_size = rank + 1
    return RankInfo(rank, local_rank, world_size, detect_run_id(env))

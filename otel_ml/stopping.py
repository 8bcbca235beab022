"""Stop on an anomaly on every rank at the same step: the one collective otel_ml offers.

``init(stop_on=[...])`` names the anomalies that should end training. By default the next
``log()`` on the rank that saw one raises :class:`otel_ml.AnomalyError`, which is right for one
process. In a multi-rank job the other ranks would not know, enter their next collective and
hang, and a sharded checkpoint started by one rank needs them all. :func:`otel_ml.agree_stop`
is the explicit agreement: every ``every``-th call it all-reduces one 64-bit integer on the
user's process group (on the current CUDA device with NCCL, on the CPU otherwise), and when any
rank has seen a ``stop_on`` anomaly it returns True on every rank at that same call, with the
cause in :func:`otel_ml.stop_reason`: the rank, type and step of the earliest such anomaly (on
one step, a rank whose loss went non-finite before ranks whose gradient norm the all-reduce
then spoiled, then the lowest rank). Once ``agree_stop`` or ``should_stop`` has been called, ``log()``
no longer raises: the loop has chosen to stop by agreement.

Nothing here runs unless the loop calls it; there is no collective anywhere else in otel_ml. On
one process, or without an initialised process group, no collective runs and the local flag
decides (on the same ``every``-th calls).

Example::

    otel_ml.init(stop_on=["nonfinite"])
    for step, batch in enumerate(loader):
        ...
        otel_ml.log(step, loss=loss)
        if otel_ml.agree_stop(every=50):
            print(otel_ml.stop_reason())   # StopReason(rank=2, type='nonfinite', step=37)
            save_checkpoint()              # every rank is here, at the same step
            break
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from otel_ml._logging import logger
from otel_ml.anomaly import Anomaly
from otel_ml.anomaly_config import TYPES

_STEP_LIMIT = (1 << 30) - 1
_RANK_LIMIT = (1 << 24) - 1


@dataclass(frozen=True)
class StopReason:
    """Why every rank stopped: the earliest ``stop_on`` anomaly of any rank (see module docstring).

    ``anomaly`` is the full :class:`otel_ml.Anomaly` on the rank that saw it, None elsewhere.

    Example::

        StopReason(rank=2, type="nonfinite", step=37)
    """

    rank: int
    type: str
    step: int | None
    anomaly: Anomaly | None = None


def encode(anomaly: Anomaly | None, rank: int) -> int:
    """One non-negative integer whose maximum over ranks is the earliest anomaly (0: none).

    Bits 33-62 hold ``limit - step`` (earlier is larger); bit 32 is set for an anomaly of the
    loss, so that on one step the rank whose loss went bad is named before the ranks whose
    gradient norm the all-reduce then spoiled; bits 8-31 hold ``limit - rank``, 0-7 the type.
    """
    if anomaly is None:
        return 0
    step = min(max(anomaly.step if anomaly.step is not None else _STEP_LIMIT - 1, 0), _STEP_LIMIT - 1)
    kind = TYPES.index(anomaly.type) + 1 if anomaly.type in TYPES else 0
    loss = 1 if anomaly.key == "loss" else 0
    rank_bits = _RANK_LIMIT - min(max(rank, 0), _RANK_LIMIT)
    return ((_STEP_LIMIT - step) << 33) | (loss << 32) | (rank_bits << 8) | kind


def decode(key: int) -> StopReason | None:
    """The :class:`StopReason` an :func:`encode` value (or the maximum of several) stands for."""
    if key <= 0:
        return None
    step = _STEP_LIMIT - (key >> 33)
    rank = _RANK_LIMIT - ((key >> 8) & _RANK_LIMIT)
    kind = key & 0xFF
    return StopReason(rank, TYPES[kind - 1] if 0 < kind <= len(TYPES) else "unknown", step)


class StopAgreement:
    """The state behind :func:`otel_ml.should_stop`, :func:`otel_ml.agree_stop` and
    :func:`otel_ml.stop_reason` for one process (see module docstring).

    ``local`` returns this rank's first ``stop_on`` anomaly, or None.

    Example::

        agreement = StopAgreement(lambda: monitor.stop_seen, rank=0)
        agreement.agree(every=10)
    """

    def __init__(self, local: Callable[[], Anomaly | None], rank: int) -> None:
        self._local = local
        self._rank = rank
        self._calls = 0
        #: True once the loop uses the agreement: then log() does not raise AnomalyError.
        self.engaged = False
        self.reason: StopReason | None = None

    def should_stop(self) -> bool:
        """True when this rank has seen a ``stop_on`` anomaly (local, no collective)."""
        self.engaged = True
        return self._local() is not None

    def agree(self, every: int = 50, group: Any = None) -> bool:
        """True on every rank at the same call once any rank has seen a ``stop_on`` anomaly."""
        self.engaged = True
        if self.reason is not None:
            return True
        if every < 1:
            raise ValueError(f"agree_stop(every=...) must be at least 1, not {every!r}")
        self._calls += 1
        if self._calls % every:
            return False
        local = self._local()
        key = encode(local, self._rank)
        dist = _distributed()
        if dist is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
            key = _all_reduce_max(dist, key, group)
        reason = decode(key)
        if reason is None:
            return False
        mine = local if local is not None and reason.rank == self._rank else None
        self.reason = StopReason(reason.rank, reason.type, reason.step, mine)
        logger.warning(
            "otel_ml: every rank stops here (call %d of agree_stop): %s on rank %d at step %s",
            self._calls,
            reason.type,
            reason.rank,
            reason.step,
        )
        return True


def _distributed() -> Any:
    """``torch.distributed`` when torch is imported and has it, else None (never imports torch)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    dist = getattr(torch, "distributed", None)
    return dist if dist is not None and dist.is_available() else None


def _all_reduce_max(dist: Any, key: int, group: Any) -> int:
    import torch

    device = torch.device("cpu")
    if dist.get_backend(group) == "nccl":  # NCCL reduces device tensors only
        device = torch.device("cuda", torch.cuda.current_device())
    flag = torch.tensor([key], dtype=torch.int64, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return int(flag.item())

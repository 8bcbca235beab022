"""Rank, local rank, world size and run id detection."""

from __future__ import annotations

import re
import socket

import pytest
import torch.distributed as dist

from otel_ml.ranks import detect, detect_run_id


def test_torchrun_variables():
    info = detect({"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "TORCHELASTIC_RUN_ID": "abc"})
    assert (info.rank, info.local_rank, info.world_size, info.run_id) == (5, 1, 8, "abc")


def test_slurm_variables_when_torchrun_ones_are_absent():
    env = {"SLURM_PROCID": "9", "SLURM_LOCALID": "3", "SLURM_NTASKS": "16", "SLURM_JOB_ID": "4242"}
    info = detect(env)
    assert (info.rank, info.local_rank, info.world_size, info.run_id) == (9, 3, 16, "slurm-4242")


def test_torchrun_variables_win_over_slurm():
    info = detect({"RANK": "1", "SLURM_PROCID": "7", "WORLD_SIZE": "2", "SLURM_NTASKS": "8"})
    assert (info.rank, info.world_size) == (1, 2)


def test_single_process_defaults():
    info = detect({})
    assert (info.rank, info.local_rank, info.world_size) == (0, 0, 1)
    assert re.match(r"^\d{8}-\d{6}-[0-9a-f]{6}$", info.run_id)


def test_bad_rank_variable_warns_and_falls_back(caplog):
    info = detect({"RANK": "zero", "SLURM_PROCID": "2", "WORLD_SIZE": "4"})
    assert info.rank == 2
    assert "RANK" in caplog.text


def test_rank_beyond_world_size_is_corrected(caplog):
    info = detect({"RANK": "4", "WORLD_SIZE": "2"})
    assert info.world_size == 5
    assert "world size" in caplog.text


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"OTEL_ML_RUN_ID": "mine", "TORCHELASTIC_RUN_ID": "te"}, "mine"),
        ({"TORCHELASTIC_RUN_ID": "te", "SLURM_JOB_ID": "1"}, "te"),
        ({"TORCHELASTIC_RUN_ID": "none", "SLURM_JOB_ID": "77", "SLURM_STEP_ID": "2"}, "slurm-77.2"),
        ({"OTEL_ML_RUN_ID": "my run/1"}, "my-run-1"),
    ],
)
def test_run_id_precedence(env, expected):
    assert detect_run_id(env) == expected


def test_all_ranks_of_a_rendezvous_agree_on_a_derived_run_id():
    base = {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500", "WORLD_SIZE": "4"}
    ids = {detect_run_id({**base, "RANK": str(r)}) for r in range(4)}
    assert len(ids) == 1
    (run_id,) = ids
    assert run_id.startswith("job-")
    assert run_id != detect_run_id({**base, "MASTER_PORT": "29501"})


@pytest.fixture
def process_group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_initialised_torch_distributed_wins_over_environment(process_group):
    info = detect({"RANK": "6", "WORLD_SIZE": "8", "LOCAL_RANK": "2"})
    assert (info.rank, info.world_size) == (0, 1)
    assert info.local_rank == 2  # torch.distributed has no local rank: it stays from the environment

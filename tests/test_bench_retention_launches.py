"""bench/retention_launches.py without a GPU: the launches it times are those of a real forward +
backward (recorded on meta tensors), named by role, and --set refuses what Tuning would."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # the bench imports the kernels' module: a pytest worker that imports triton here without the
    # interpreter would leave the next kernel test file of that worker without a backend
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton

import pytest  # noqa: E402

from bench import retention_launches as bench  # noqa: E402
from retnet_train.model.kernels.retention_launch import Tuning  # noqa: E402

META = torch.device("meta")


def test_keeping_both_leaves_eight_launches_named_by_role():
    got = bench.recorded_launches(8, 2048, Tuning(keep_states=True, keep_scores=True), META)
    assert [role for role, _ in got] == [
        "forward scores", "forward walk", "forward outputs", "backward reverse walk", "backward gradient scores",
        "backward dq", "backward dk", "backward dv"]
    kernels = [x.kernel.__name__ for _, x in got]
    assert kernels == ["intra_scores_kernel", "segment_states_kernel", "segment_outputs_kernel",
                       "segment_states_kernel", "intra_scores_kernel"] + ["segment_outputs_kernel"] * 3
    # the walks run over each of the 8 sequences and heads; the outputs over 64 segments of 256 tokens
    assert got[1][1].grid[1:] == (8, 8) and got[2][1].grid[1:] == (64, 8)


def test_recomputing_backward_names_the_recomputed_passes():
    roles = [role for role, _ in bench.recorded_launches(2, 8192, Tuning(), META)]
    assert roles[3:] == ["backward walk (recomputed)", "backward reverse walk", "backward scores (recomputed)",
                         "backward gradient scores", "backward dq", "backward dk", "backward dv"]


def test_set_parses_tuning_fields_and_names_bad_ones():
    assert bench.parse_sets(["block_z=64", "keep_states=true", "state_block=64x32"]) == {
        "block_z": 64, "keep_states": True, "state_block": (64, 32)}
    with pytest.raises(SystemExit, match="key one of"):
        bench.parse_sets(["blockz=64"])
    with pytest.raises(SystemExit, match="true or false"):
        bench.parse_sets(["keep_states=1"])
    with pytest.raises(SystemExit, match="an int"):
        bench.parse_sets(["block_z=wide"])
    with pytest.raises(SystemExit, match="two ints joined by x"):
        bench.parse_sets(["state_block=64"])
    with pytest.raises(SystemExit, match="chunk size 24 must be a power of two"):
        bench.parse_sets(["chunk=24"])

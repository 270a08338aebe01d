"""bench/retention_stalls.py without a GPU: the ncu command it builds (skip the compiling run,
profile the op's launches, clocks left alone), and how it reads ncu's raw CSV back into rows."""

from __future__ import annotations

import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton (see test_bench_retention_launches)

import pytest  # noqa: E402

from bench import retention_stalls as bench  # noqa: E402

ROLES_BOTH = ["forward scores", "forward walk", "forward outputs", "backward reverse walk",
              "backward gradient scores", "backward dq", "backward dk", "backward dv"]

RAW = '''==PROF== Connected to process 123
==PROF== Disconnected from process 123
"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","gpu__time_duration.sum","dram__throughput.avg.pct_of_peak_sustained_elapsed","smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio","smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio","smsp__average_warps_issue_stalled_wait_per_issue_active.ratio","smsp__average_warps_issue_stalled_selected_per_issue_active.ratio","smsp__average_warps_issue_stalled_long_scoreboard_not_issued_per_issue_active.ratio"
"","","","","","","","nsecond","%","ratio","ratio","ratio","ratio","ratio"
"0","123","python3","host","intra_scores_kernel","1","7","79,104","61.5","4.25","0.5","1.25","1","9"
"1","123","python3","host","segment_states_kernel","1","7","203,000","40","0","2","","1","0"
'''


def test_the_roles_are_the_launches_of_a_real_call():
    assert bench.roles(8, 2048, "both") == ROLES_BOTH
    assert len(bench.roles(8, 2048, "none")) > len(ROLES_BOTH)  # the backward recomputes the walk and scores


def test_ncu_skips_the_compiling_run_and_profiles_one_call_with_the_clocks_left_alone():
    cmd = bench.ncu_command("ncu", 2, 8192, "both", Path("/tmp/r.ncu-rep"))
    opt = {cmd[i]: cmd[i + 1] for i in range(1, len(cmd) - 1) if cmd[i].startswith("--")}
    assert opt["--clock-control"] == "none"
    assert opt["--launch-skip"] == opt["--launch-count"] == "8"
    assert opt["--export"] == "/tmp/r.ncu-rep"
    assert all(k in opt["--kernel-name"] for k in bench.KERNELS)
    assert opt["--metrics"].count("regex:") == len(bench.THROUGHPUT) + len(bench.STALLS)
    assert cmd[-4:] == ["--target", "2x8192", "--keep", "both"]
    assert cmd[cmd.index("--force-overwrite") + 2].endswith("retention_stalls.py")


def test_raw_csv_gives_one_record_per_kernel_with_units():
    kernels = bench.parse_raw_csv(RAW)
    assert [k["Kernel Name"][1] for k in kernels] == ["intra_scores_kernel", "segment_states_kernel"]
    assert kernels[0]["gpu__time_duration.sum"] == (79104.0, "nsecond")
    assert "smsp__average_warps_issue_stalled_wait_per_issue_active.ratio" not in kernels[1]  # empty cell


def test_a_row_has_microseconds_throughputs_and_the_largest_stalls():
    first, second = (bench.summarize(k) for k in bench.parse_raw_csv(RAW))
    assert first["us"] == "79" and first["DRAM %"] == "62" and first["L2 %"] == ""  # not collected: blank
    # largest first; the not_issued variant (9) is not a reason of its own
    assert first["stalls"] == "long_scoreboard 4.2, wait 1.2, selected 1.0 (warps per issue; all 7.0)"
    assert second["us"] == "203"
    assert second["stalls"] == "barrier 2.0, selected 1.0 (warps per issue; all 3.0)"  # zeros left out


def test_without_the_per_issue_ratios_the_pc_samples_give_the_stalls_in_percent():
    kernel = {"smsp__pcsamp_warps_issue_stalled_long_scoreboard": (60.0, ""),
              "smsp__pcsamp_warps_issue_stalled_barrier": (30.0, ""),
              "smsp__pcsamp_warps_issue_stalled_barrier_not_issued": (25.0, ""),
              "smsp__pcsamp_warps_issue_stalled_wait": (10.0, "")}
    assert bench.summarize(kernel, top=2)["stalls"] == "long_scoreboard 60.0, barrier 30.0 (% of samples; all 100.0)"
    assert bench.summarize({})["stalls"] == ""


def test_a_duration_in_an_unknown_unit_is_shown_with_it():
    assert bench.summarize({"gpu__time_duration.sum": (3.0, "cycle")})["us"] == "3 cycle"


def test_output_without_a_csv_header_is_an_error_that_shows_it():
    with pytest.raises(ValueError, match="no CSV header.*PROF"):
        bench.parse_raw_csv("==PROF== ERR_NVGPUCTRPERM - no permission\n")

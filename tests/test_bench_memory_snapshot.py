"""bench/memory_snapshot.py's trace replay, on a hand-made allocator trace (the recording itself
needs CUDA)."""

from __future__ import annotations

from bench.memory_snapshot import by_owner, owner, peak_live, report

OURS = [{"filename": "/x/torch/nn/functional.py", "line": 1, "name": "linear"},
        {"filename": "/repo/retnet_train/model/retnet.py", "line": 97, "name": "forward"}]
ADAM = [{"filename": "/x/torch/optim/adamw.py", "line": 5, "name": "step"}]


def ev(action, addr, size, frames=OURS):
    return {"action": action, "addr": addr, "size": size, "frames": frames}


def test_the_peak_is_the_most_bytes_live_at_once_and_an_oom_ends_the_replay():
    trace = [ev("alloc", 1, 100), ev("alloc", 2, 50, ADAM), ev("free_requested", 1, 100),
             ev("free_completed", 1, 100), ev("alloc", 3, 120), ev("free_completed", 3, 120), ev("alloc", 4, 10)]
    peak, blocks = peak_live(trace)
    assert peak == 170 and sorted(blocks) == [2, 3]  # 50 + 120, after block 1 was freed
    assert by_owner(blocks) == [("retnet_train/model/retnet.py:97 forward", 120, 1),
                                ("torch/optim/adamw.py:5 step", 50, 1)]
    # at an out-of-memory error: what was live then, even below an earlier peak
    oom = trace[:6] + [{"action": "oom", "addr": 0, "size": 10**9, "frames": OURS}, ev("alloc", 5, 999)]
    assert peak_live(oom) == (50, {2: trace[1]})
    text = report({"device_traces": [oom]}, top=5)
    assert "0.00 GiB live at the out-of-memory error" in text and "| 1 | torch/optim/adamw.py:5 step |" in text


def test_our_frame_names_the_allocation_before_torch_internals():
    assert owner(OURS) == "retnet_train/model/retnet.py:97 forward"
    assert owner([]) == "(no python frame)"
    assert report({"device_traces": [[]]}, top=3).startswith("no allocation trace")

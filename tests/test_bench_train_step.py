"""bench/train_step.py's trainer setups: each --trainer-setup reaches the trainer as its ZeRO stage
and precision, and a malformed one stops the bench before any run (no training here)."""

from __future__ import annotations

import types

import pytest

from bench import train_step as bench


@pytest.mark.parametrize("setup, expected", [("zero2:auto", (2, "auto")), ("zero0:bf16_autocast", (0, "bf16_autocast")),
                                             ("zero3:bf16", (3, "bf16"))])
def test_a_setup_names_stage_and_precision(setup, expected):
    assert bench.parse_setup(setup) == expected


@pytest.mark.parametrize("setup", ["zero2", "zero:auto", "stage2:auto", "zero2:bf32", "zero0:"])
def test_a_malformed_setup_is_named(setup):
    with pytest.raises(SystemExit, match=f"--trainer-setup '{setup}'"):
        bench.parse_setup(setup)


def test_the_trainer_row_runs_with_the_setup(monkeypatch):
    import bench.train_throughput as throughput

    seen = {}

    def fake_measure(preset, seq_len, ns):
        seen.update(preset=preset, seq_len=seq_len, zero=ns.zero, precision=ns.precision,
                    micro=ns.micro_batch, overrides=ns.overrides)
        return {"tokens_per_s": 1.0, "peak_mem_gib": 2.0, "first_loss": 3.0, "loss": 2.5}

    monkeypatch.setattr(throughput, "measure", fake_measure)
    args = types.SimpleNamespace(size="1.3b", warmup=1, steps=2, compile=False, profile=False, chunk_size=None,
                                 act_ckpt="none", memory_budget=None)
    row = bench.through_trainer(2048, 16384, args, "triton", "zero0:bf16_autocast", "states")
    assert seen == dict(preset="retnet_1.3b", seq_len=2048, zero=0, precision="bf16_autocast", micro=8,
                        overrides=["model.kernels=triton", "model.retention_keep=states"])
    assert row["batch"] == 8 and row["loss"] == "3.00 -> 2.50"
    assert bench.label("trainer", args, "triton", "zero0:bf16_autocast").endswith("(kernels=triton, zero0:bf16_autocast)")
    assert bench.label("trainer", args, "triton", "zero2:auto").endswith("(kernels=triton)")
    assert bench.label("plain", args, "triton", "-", "both").endswith("(kernels=triton, retention_keep=both)")


@pytest.mark.parametrize("spec, fields", [
    ("trainer:2048:16384:triton:zero0:bf16_autocast:both", ("trainer", 2048, 16384, "triton", "zero0:bf16_autocast", "both")),
    ("plain:8192:16384:auto:-:none", ("plain", 8192, 16384, "auto", "-", "none")),
    ("fla:2048:16384:-:-:-", ("fla", 2048, 16384, "-", "-", "-")),
])
def test_a_run_spec_keeps_the_setup_whole(spec, fields):
    # the setup holds a colon of its own: a plain split took "zero0" for it and every trainer row failed
    assert bench.parse_spec(spec) == fields


def test_a_memory_budget_reaches_the_trainer_and_labels_the_rows(monkeypatch):
    import bench.train_throughput as throughput

    seen = {}
    monkeypatch.setattr(throughput, "measure", lambda preset, seq_len, ns: seen.update(overrides=ns.overrides) or
                        {"tokens_per_s": 1.0, "peak_mem_gib": 2.0, "first_loss": 3.0, "loss": 2.5})
    args = types.SimpleNamespace(size="1.3b", warmup=1, steps=2, compile=True, profile=False, chunk_size=None,
                                 act_ckpt="none", memory_budget=0.3)
    bench.check_budget(args)
    bench.through_trainer(8192, 16384, args, "triton", "zero0:bf16_autocast", "none")
    assert seen["overrides"][-1] == "trainer.activation_memory_budget=0.3"
    assert bench.label("plain", args, "triton").endswith("(kernels=triton, memory budget 0.3)")
    assert bench.label("transformer", args, "-").endswith("(SDPA, memory budget 0.3)")


@pytest.mark.parametrize("changes, message", [
    (dict(compile=False), "--memory-budget 0.3: needs trainer.compile=true"),
    (dict(act_ckpt="full"), "--memory-budget 0.3: acts only on blocks without activation checkpointing, and "
                            "trainer.activation_checkpointing=full covers every block"),
    (dict(memory_budget=1.5), r"--memory-budget 1.5: must be a share of the activations in \[0, 1\]"),
])
def test_a_memory_budget_the_compiler_cannot_use_is_named(changes, message):
    args = types.SimpleNamespace(**{**dict(compile=True, act_ckpt="none", memory_budget=0.3), **changes})
    with pytest.raises(SystemExit, match=message):
        bench.check_budget(args)

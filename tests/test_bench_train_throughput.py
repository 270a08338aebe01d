"""bench/train_throughput.py's configurations: an experiment is measured as its file says, a preset
as the flags say (no training here: the bench's runs are GPU work)."""

from __future__ import annotations

from bench import train_throughput as bench
from retnet_train.config import load_config


def test_an_experiment_keeps_its_own_settings_and_steps_one_micro_batch_per_rank():
    args = bench.parse(["--experiment", "retnet_1.3b_128k", "--grad-accum", "2"])
    key = bench.experiment_key("retnet_1.3b_128k")
    overrides = bench.shape_overrides(key, None, args, world=2)
    assert overrides == [key, f"trainer.global_batch_tokens={1 * 131072 * 2 * 2}"]
    cfg = load_config([*overrides, "trainer.data_source=synthetic"])
    t = cfg.trainer
    assert (t.seq_len, t.micro_batch_size, t.activation_checkpointing, t.checkpoint_layers, t.compile,
            t.activation_memory_budget, cfg.deepspeed.stage) == (131072, 1, "none", None, True, 0.1, 2)


def test_a_preset_takes_the_shape_and_trainer_flags():
    args = bench.parse(["--preset", "retnet_tiny", "--seq-len", "256", "--tokens-per-step", "1024", "--tp", "2",
                        "--act-ckpt", "--zero", "1", "--chunk-size", "32"])
    overrides = bench.shape_overrides("retnet_tiny", 256, args, world=4)
    assert {"model=retnet_tiny", "trainer.seq_len=256", "trainer.micro_batch_size=4",
            f"trainer.global_batch_tokens={4 * 256 * 2}", "trainer.activation_checkpointing=True",
            "deepspeed=zero1", "parallel.tp=2", "trainer.chunk_size=32"} <= set(overrides)


def test_profile_adds_one_untimed_profiled_step():
    args = bench.parse(["--preset", "retnet_tiny", "--steps", "4", "--warmup", "2", "--profile"])
    overrides = bench.run_overrides("retnet_tiny", 256, args, world=1, run_dir="/tmp/x")
    cfg = load_config(overrides)
    assert (cfg.trainer.max_steps, cfg.logging.profile.start, cfg.logging.profile.steps) == (7, 7, 1)
    assert not cfg.logging.profile.trace
    plain = load_config(bench.run_overrides("retnet_tiny", 256, bench.parse(["--preset", "retnet_tiny"]), 1, "/tmp/x"))
    assert plain.logging.profile.start == 0 and plain.trainer.max_steps == 13


def test_a_run_stopped_before_its_measured_steps_is_named_not_divided_by_zero(monkeypatch):
    """A time limit's SIGTERM makes the trainer stop early (a stop request); a run that logged only its
    warmup steps fails with what happened instead of a ZeroDivisionError in the tokens/s."""
    import json
    import types
    from pathlib import Path

    import pytest
    import torch

    import retnet_train.train.trainer as trainer_module

    class StoppedAfterWarmup:
        def __init__(self, cfg):
            self.cfg = cfg
            self.ps = types.SimpleNamespace(device=torch.device("cpu"), is_main=True, world_size=1)
            self.profiler = types.SimpleNamespace(report=Path(cfg.run_dir) / "no-profile")

        def fit(self):
            lines = [json.dumps({"step": s, "loss": 10.0, "tokens_per_s": 1000.0}) for s in (1, 2)]
            (Path(self.cfg.run_dir) / "metrics.jsonl").write_text("\n".join(lines) + "\n")

    monkeypatch.setattr(trainer_module, "Trainer", StoppedAfterWarmup)
    args = bench.parse(["--preset", "retnet_tiny", "--steps", "3", "--warmup", "2"])
    with pytest.raises(RuntimeError, match=r"retnet_tiny T=256: the trainer logged 2 steps, none of the measured "
                                           r"steps 3-5 \(stopped early\?\)"):
        bench.measure("retnet_tiny", 256, args)


def test_a_bench_stopped_mid_way_writes_the_finished_rows_and_exits_with_the_signal(monkeypatch):
    """Ctrl-C (or SIGTERM: bench/stoppable.py) during the second of two isolated configurations: the
    table holds the first one's row, its notes say the bench was cut, the exit code is 128 + SIGINT."""
    import signal
    import sys

    import pytest

    from bench import results

    row = {"preset": "retnet_tiny", "seq_len": 2048, "micro": 1, "world": 1, "zero": 0, "precision": "bf16",
           "mode": "chunkwise", "act_ckpt": "none", "compile": False, "tokens_per_s": 1000.0,
           "tokens_per_s_per_device": 1000.0, "mfu": 0.1, "peak_mem_gib": 1.0, "first_loss": 10.0, "loss": 9.0,
           "is_main": True}

    def measure_isolated(preset, seq_len):
        if seq_len == 4096:
            raise KeyboardInterrupt
        return row

    table = {}
    monkeypatch.setattr(bench, "measure_isolated", measure_isolated)
    monkeypatch.setattr(results, "append", lambda title, header, rows, **kw: table.update(rows=rows, **kw))
    monkeypatch.setattr(sys, "argv", ["train_throughput.py", "--preset", "retnet_tiny", "--seq-len", "2048", "4096",
                                      "--no-save"])
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit) as exit_:
        bench.main()
    assert exit_.value.code == 128 + signal.SIGINT
    assert [r[:2] for r in table["rows"]] == [["retnet_tiny", 2048]]
    assert "CUT SHORT by SIGINT after 1 of 2 runs" in table["notes"]

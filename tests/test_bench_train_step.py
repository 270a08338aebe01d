"""bench/train_step.py's trainer setups and memory budgets: each --trainer-setup reaches the trainer as
its ZeRO stage and precision, each --memory-budget value is its own run of each of our models, and a
malformed value stops the bench before any run (no training here: the runner is faked)."""

from __future__ import annotations

import sys
import time
import types

import pytest

from bench import train_step as bench


@pytest.mark.parametrize("setup, expected", [
    ("zero2:auto", (2, "auto", "none", "weights", {})),
    ("zero0:bf16_autocast", (0, "bf16_autocast", "none", "weights", {})),
    ("zero3:bf16", (3, "bf16", "none", "weights", {})),
    ("zero0:auto:tensorwise", (0, "auto", "tensorwise", "weights", {})),
    ("zero1:bf16:rowwise", (1, "bf16", "rowwise", "weights", {})),
    ("zero0:auto:tensorwise:bf16", (0, "auto", "tensorwise", "bf16", {})),
    ("zero0:auto:none:bf16", (0, "auto", "none", "bf16", {})),
    ("zero0:auto:tensorwise:bf16:float8_fast_accum=all:compile_tuning=coordinate_descent",
     (0, "auto", "tensorwise", "bf16", {"float8_fast_accum": "all", "compile_tuning": "coordinate_descent"})),
])
def test_a_setup_names_stage_precision_float8_residual_and_other_keys(setup, expected):
    assert bench.parse_setup(setup) == expected


@pytest.mark.parametrize("setup", ["zero2", "zero:auto", "stage2:auto", "zero2:bf32", "zero0:", "zero0:auto:fp8",
                                   "zero0:auto:tensorwise:x", "zero0:auto:tensorwise:fp16",
                                   "zero0:auto:tensorwise:bf16:all", "zero0:auto:tensorwise:bf16:no_such_key=1",
                                   "zero0:auto:tensorwise:bf16:float8_fast_accum="])
def test_a_malformed_setup_is_named(setup):
    with pytest.raises(SystemExit, match=f"--trainer-setup '{setup}'"):
        bench.parse_setup(setup)


def test_the_trainer_row_runs_with_the_setup(monkeypatch):
    import bench.train_throughput as throughput

    seen = {}

    def fake_measure(preset, seq_len, ns):
        seen.update(preset=preset, seq_len=seq_len, zero=ns.zero, precision=ns.precision,
                    micro=ns.micro_batch, overrides=ns.overrides)
        return {"tokens_per_s": 1.0, "peak_mem_gib": 2.0, "first_loss": 3.0, "loss": 2.5, "precision": "bf16_autocast"}

    monkeypatch.setattr(throughput, "measure", fake_measure)
    args = types.SimpleNamespace(size="1.3b", warmup=1, steps=2, compile=False, profile=False, chunk_size=None,
                                 act_ckpt="none", compile_tuning="default",
                                 compile_pdl=False)
    row = bench.through_trainer(2048, 16384, args, "triton", "zero0:bf16_autocast", "states")
    assert seen == dict(preset="retnet_1.3b", seq_len=2048, zero=0, precision="bf16_autocast", micro=8,
                        overrides=["model.kernels=triton", "model.retention_keep=states"])
    assert row["batch"] == 8 and row["loss"] == "3.00 -> 2.50"
    assert bench.label("trainer", args, "triton", "zero0:bf16_autocast").endswith("(kernels=triton, zero0:bf16_autocast)")
    assert bench.label("trainer", args, "triton", "zero2:auto").endswith("(kernels=triton)")
    # what `auto` ran as is shown where its meaning is not the default's (ZeRO-0 changed at c7a4a2b)
    assert row["precision"] == "bf16_autocast"
    assert bench.label("trainer", args, "triton", "zero0:auto", precision="bf16_autocast").endswith(
        "(kernels=triton, zero0:auto = bf16_autocast)")
    assert bench.label("trainer", args, "triton", "zero2:auto", precision="bf16").endswith("(kernels=triton)")
    assert bench.label("trainer", args, "triton", "zero0:fp32", precision="fp32").endswith(
        "(kernels=triton, zero0:fp32)")
    assert bench.label("plain", args, "triton", "-", "both").endswith("(kernels=triton, retention_keep=both)")
    bench.through_trainer(2048, 16384, args, "triton", "zero0:auto:tensorwise", "none")
    assert seen["zero"] == 0 and seen["precision"] == "auto" and "trainer.float8=tensorwise" in seen["overrides"]
    assert bench.label("trainer", args, "triton", "zero0:auto:tensorwise",
                       precision="bf16_autocast + fp8 tensorwise").endswith(
        "(kernels=triton, zero0:auto:tensorwise = bf16_autocast + fp8 tensorwise)")
    bench.through_trainer(2048, 16384, args, "triton", "zero0:auto:tensorwise:bf16", "none")
    assert "trainer.float8=tensorwise" in seen["overrides"] and "trainer.residual_dtype=bf16" in seen["overrides"]
    bench.through_trainer(2048, 16384, args, "triton", "zero0:auto:tensorwise", "none")
    assert not any(o.startswith("trainer.residual_dtype") for o in seen["overrides"])  # the default is not passed
    bench.through_trainer(2048, 16384, args, "triton", "zero0:auto:tensorwise:bf16:float8_fast_accum=all", "none")
    assert "trainer.float8_fast_accum=all" in seen["overrides"]


@pytest.mark.parametrize("spec, fields", [
    ("trainer:2048:16384:triton:zero0:bf16_autocast:both:0.3",
     ("trainer", 2048, 16384, "triton", "zero0:bf16_autocast", "both", "0.3")),
    ("plain:8192:16384:auto:-:none:none", ("plain", 8192, 16384, "auto", "-", "none", "none")),
    ("fla:2048:16384:-:-:-:-", ("fla", 2048, 16384, "-", "-", "-", "-")),
])
def test_a_run_spec_keeps_the_setup_whole(spec, fields):
    # the setup holds a colon of its own: a plain split took "zero0" for it and every trainer row failed
    assert bench.parse_spec(spec) == fields
    run, t, tokens, kernels, setup, keep, budget = fields
    assert f"{run}:{t}:{tokens}:{kernels}:{setup}:{keep}:{budget}" == spec  # the round trip run_specs relies on


def test_a_memory_budget_reaches_the_trainer_and_labels_the_rows(monkeypatch):
    import bench.train_throughput as throughput

    seen = {}
    monkeypatch.setattr(throughput, "measure", lambda preset, seq_len, ns: seen.update(overrides=ns.overrides) or
                        {"tokens_per_s": 1.0, "peak_mem_gib": 2.0, "first_loss": 3.0, "loss": 2.5, "precision": "bf16"})
    args = types.SimpleNamespace(size="1.3b", warmup=1, steps=2, compile=True, profile=False, chunk_size=None,
                                 act_ckpt="none", compile_tuning="default",
                                 compile_pdl=False)
    assert bench.check_budget("0.30", args) == "0.3" and bench.check_budget("none", args) == "none"
    bench.through_trainer(8192, 16384, args, "triton", "zero0:bf16_autocast", "none", 0.3)
    assert seen["overrides"][-1] == "trainer.activation_memory_budget=0.3"
    bench.through_trainer(8192, 16384, args, "triton", "zero0:bf16_autocast", "none", None)
    assert seen["overrides"] == ["model.kernels=triton", "model.retention_keep=none"]
    args.compile_tuning = "coordinate_descent"  # --compile-tuning reaches the trainer as its key
    bench.through_trainer(8192, 16384, args, "triton", "zero0:bf16_autocast", "none", None)
    assert seen["overrides"][-1] == "trainer.compile_tuning=coordinate_descent"
    args.compile_pdl = True  # --compile-pdl too
    bench.through_trainer(8192, 16384, args, "triton", "zero0:bf16_autocast", "none", None)
    assert seen["overrides"][-2:] == ["trainer.compile_tuning=coordinate_descent", "trainer.compile_pdl=true"]
    # one budget keeps the labels of older RESULTS rows
    assert bench.label("plain", args, "triton", budget="0.3").endswith("(kernels=triton, memory budget 0.3)")
    assert bench.label("transformer", args, "-", budget="0.3").endswith("(SDPA, memory budget 0.3)")
    assert bench.label("transformer", args, "-", budget="none").endswith("(SDPA)")


@pytest.mark.parametrize("changes, budget, message", [
    (dict(compile=False), "0.3", "--memory-budget 0.3: needs trainer.compile=true"),
    (dict(act_ckpt="full"), "0.3", "--memory-budget 0.3: acts only on blocks without activation checkpointing, and "
                                   "trainer.activation_checkpointing=full covers every block"),
    ({}, "1.5", r"--memory-budget 1.5: must be a share of the activations in \[0, 1\]"),
    ({}, "abc", r"--memory-budget 'abc': expected none or a share of the activations in \[0, 1\]"),
])
def test_a_memory_budget_the_compiler_cannot_use_is_named(changes, budget, message):
    args = types.SimpleNamespace(**{**dict(compile=True, act_ckpt="none"), **changes})
    with pytest.raises(SystemExit, match=message):
        bench.check_budget(budget, args)


# ---- several budgets in one bench run (the runner faked: each spec gets a made-up result) -----------


PEAK = {("trainer", "none"): 40.0, ("trainer", "0.4"): 28.0, ("trainer", "0.3"): 24.0, ("transformer", "none"): 50.0,
        ("transformer", "0.4"): 35.0, ("transformer", "0.3"): 30.0, ("fla", "-"): 45.0}


def fake_run(spec: str) -> dict:
    run, t, _, _, _, _, budget = bench.parse_spec(spec)
    return {"run": run, "seq_len": t, "tokens_per_s": 1000.0 * (t // 1024), "peak_gib": PEAK[run, budget],
            "batch": 16384 // t, "loss": "11.00 -> 3.00"}


def run_main(monkeypatch, *flags, runner=fake_run) -> tuple[list[str], list[list]]:
    """bench.main() with these flags and --no-save: the specs it ran and the rows of its table."""
    from bench import results  # the module here: `bench` is train_step

    ran, table = [], {}
    monkeypatch.setattr(bench, "run_isolated", lambda spec: ran.append(spec) or runner(spec))
    monkeypatch.setattr(results, "append", lambda title, header, rows, **kw: table.update(rows=rows, **kw))
    monkeypatch.setattr(sys, "argv", ["train_step.py", *flags, "--no-save"])
    bench.main()
    return ran, table["rows"]


def test_each_of_our_models_runs_once_per_budget_and_fla_once(monkeypatch):
    ran, _ = run_main(monkeypatch, "--runs", "trainer", "transformer", "fla", "--compile", "--kernels", "triton",
                      "--trainer-setup", "zero0:bf16_autocast", "--seq-len", "8192",
                      "--memory-budget", "none", "0.40", "0.3")
    # retention_keep=both by default: what experiment=retnet_1.3b trains with
    assert ran == ["trainer:8192:16384:triton:zero0:bf16_autocast:both:none",
                   "trainer:8192:16384:triton:zero0:bf16_autocast:both:0.4",
                   "trainer:8192:16384:triton:zero0:bf16_autocast:both:0.3",
                   "transformer:8192:16384:-:-:-:none", "transformer:8192:16384:-:-:-:0.4",
                   "transformer:8192:16384:-:-:-:0.3", "fla:8192:16384:-:-:-:-"]


def test_memory_is_set_against_the_transformer_at_the_same_budget_and_at_none(monkeypatch):
    def runner(spec):  # the Transformer's run at 0.4 fails: the trainer's at 0.4 has none at its budget
        failed = spec.startswith("transformer") and spec.endswith(":0.4")
        return {"run": "transformer", "seq_len": 8192, "error": "failed (exit 1)"} if failed else fake_run(spec)

    _, rows = run_main(monkeypatch, "--runs", "trainer", "transformer", "fla", "--compile", "--kernels", "triton",
                       "--trainer-setup", "zero0:bf16_autocast", "--seq-len", "8192",
                       "--memory-budget", "none", "0.3", "0.4", runner=runner)
    # model, then: peak GiB, x fla tokens/s, x Transformer memory (same budget), (no budget)
    got = {row[0]: row[4:8] for row in rows}
    ours = "our RetNet-1.3b, trainer (kernels=triton, zero0:bf16_autocast, retention_keep=both"
    assert got == {
        f"{ours})": ["40.0", "1.00", "0.80", "0.80"],
        f"{ours}, memory budget 0.3)": ["24.0", "1.00", "0.80", "0.48"],
        f"{ours}, memory budget 0.4)": ["28.0", "1.00", "", "0.56"],
        "our Transformer-1.3b (SDPA)": ["50.0", "1.00", "1.00", "1.00"],
        "our Transformer-1.3b (SDPA, memory budget 0.3)": ["30.0", "1.00", "1.00", "0.60"],
        "our Transformer-1.3b (SDPA, memory budget 0.4)": ["", "", "", ""],
        "fla RetNet-1.3b (flash-linear-attention)": ["45.0", "1.00", "", "0.90"],  # fla has no budget of its own
    }


def test_one_budget_keeps_the_old_labels_and_leaves_the_no_budget_column_blank(monkeypatch):
    ran, rows = run_main(monkeypatch, "--runs", "trainer", "transformer", "--compile", "--kernels", "triton",
                         "--trainer-setup", "zero0:bf16_autocast", "--seq-len", "8192", "--memory-budget", "0.3")
    assert [row[0] for row in rows] == [
        "our RetNet-1.3b, trainer (kernels=triton, zero0:bf16_autocast, retention_keep=both, memory budget 0.3)",
        "our Transformer-1.3b (SDPA, memory budget 0.3)"]
    assert [row[6:8] for row in rows] == [["0.80", ""], ["1.00", ""]]


@pytest.mark.parametrize("flags, message", [
    (["--compile", "--memory-budget", "none", "abc"], "--memory-budget 'abc': expected none or a share"),
    (["--compile", "--act-ckpt", "full", "--memory-budget", "none", "0.3"],
     "--memory-budget 0.3: acts only on blocks without activation checkpointing"),
    (["--memory-budget", "0.3"], "--memory-budget 0.3: needs trainer.compile=true"),
    (["--compile-tuning", "coordinate_descent"], "--compile-tuning coordinate_descent: needs --compile"),
    (["--compile-pdl"], "--compile-pdl: needs --compile"),
])
def test_a_bad_budget_stops_the_bench_before_any_run(monkeypatch, flags, message):
    ran = []
    monkeypatch.setattr(bench, "run_isolated", lambda spec: ran.append(spec) or fake_run(spec))
    monkeypatch.setattr(sys, "argv", ["train_step.py", "--runs", "trainer", "transformer", *flags, "--no-save"])
    with pytest.raises(SystemExit, match=message):
        bench.main()
    assert ran == []


def test_the_budget_chart_draws_each_model_through_its_budgets(monkeypatch):
    from bench import charts

    drawn = {}
    monkeypatch.setattr(charts, "chart", lambda path, *a, logx=True, point_labels=None, **kw: drawn.update(
        {path.name: (a[3], logx), "labels": point_labels}) or True)
    args = types.SimpleNamespace(size="1.3b", seq_len=[8192])
    specs = ["trainer:8192:16384:triton:zero0:bf16_autocast:none:none",
             "trainer:8192:16384:triton:zero0:bf16_autocast:none:0.3",
             "transformer:8192:16384:-:-:-:none", "transformer:8192:16384:-:-:-:0.3", "fla:8192:16384:-:-:-:-"]
    written = bench.budget_charts({bench.parse_spec(s): fake_run(s) for s in specs}, args)
    assert [p.name for p in written] == ["train_step_memory_budget_T8192.png"]
    series, logx = drawn["train_step_memory_budget_T8192.png"]
    assert not logx
    assert series == {  # (peak GiB, tokens/s), in budget order; labels without their budget
        "our RetNet-1.3b, trainer (kernels=triton, zero0:bf16_autocast)": [(40.0, 8000.0), (24.0, 8000.0)],
        "our Transformer-1.3b (SDPA)": [(50.0, 8000.0), (30.0, 8000.0)],
        "fla RetNet-1.3b (flash-linear-attention)": [(45.0, 8000.0)],
    }
    assert drawn["labels"] == {  # each point's budget beside it; fla has none
        "our RetNet-1.3b, trainer (kernels=triton, zero0:bf16_autocast)": ["none", "0.3"],
        "our Transformer-1.3b (SDPA)": ["none", "0.3"],
        "fla RetNet-1.3b (flash-linear-attention)": [""],
    }


# ---- --rounds: every configuration several times, interleaved ------------------------------------


def test_rounds_interleave_the_runs_and_each_row_shows_its_median_run_and_spread(monkeypatch):
    calls: dict[str, int] = {}
    rates = {"trainer": [66.0, 64.0, 67.0], "fla": [44.0, 45.0, 43.0]}  # tokens/s (k) by round

    def runner(spec):
        run = spec.split(":")[0]
        n = calls[run] = calls.get(run, 0) + 1
        out = fake_run(spec)
        return {**out, "tokens_per_s": 1e3 * rates[run][n - 1], "loss": f"round {n}"}

    ran, rows = run_main(monkeypatch, "--runs", "trainer", "fla", "--kernels", "triton", "--trainer-setup",
                         "zero0:bf16_autocast", "--seq-len", "2048", "--rounds", "3", runner=runner)
    trainer, fla = "trainer:2048:16384:triton:zero0:bf16_autocast:both:none", "fla:2048:16384:-:-:-:-"
    assert ran == [trainer, fla] * 3  # round by round, not one configuration's three runs in a row
    got = {row[0].split(" (")[0]: row for row in rows}
    ours, theirs = got["our RetNet-1.3b, trainer"], got["fla RetNet-1.3b"]
    # tokens/s, spread (runs), ...: the median run (its loss too) and (max - min) / median
    assert ours[3:5] == ["66.0k", "4.5% (3)"] and ours[-1] == "round 1"
    assert theirs[3:5] == ["44.0k", "4.5% (3)"] and theirs[-1] == "round 1"
    assert ours[6] == "1.50"  # x fla from the two medians


def test_a_configuration_failing_in_some_rounds_keeps_its_good_runs_and_one_failing_in_all_its_error():
    good = {"tokens_per_s": 10.0, "peak_gib": 1.0, "batch": 1, "loss": "a"}
    rounds = [{("a",): {**good, "tokens_per_s": 12.0}, ("b",): {"error": "out of memory"}},
              {("a",): {"error": "failed (exit 1)"}, ("b",): {"error": "failed (exit 1)"}},
              {("a",): good, ("b",): {"error": "out of memory"}}]
    out = bench.combine_rounds(rounds)
    assert out[("a",)]["tokens_per_s"] == 10.0 and out[("a",)]["runs"] == 2  # the lower of two: a real run
    assert out[("a",)]["spread"] == pytest.approx(20.0)
    assert out[("b",)] == {"error": "out of memory"}


def test_rounds_below_one_are_refused_before_any_run(monkeypatch):
    ran = []
    monkeypatch.setattr(bench, "run_isolated", lambda spec: ran.append(spec) or fake_run(spec))
    monkeypatch.setattr(sys, "argv", ["train_step.py", "--runs", "fla", "--rounds", "0", "--no-save"])
    with pytest.raises(SystemExit, match="--rounds 0: at least 1"):
        bench.main()
    assert ran == []


@pytest.mark.parametrize("stop", ["sigterm", "ctrl-c"])
def test_a_bench_stopped_mid_way_writes_the_rows_that_finished_and_exits_with_the_signal(monkeypatch, stop):
    """`timeout` (SIGTERM to the group) or Ctrl-C during the second run: the table holds the first run's
    row, its notes say the bench was cut, and the exit code is the signal's (128 + n)."""
    import os
    import signal

    from bench import results

    def runner(spec):
        if spec.startswith("trainer"):
            if stop == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # the handler raises before this ends
            raise KeyboardInterrupt
        return fake_run(spec)

    table = {}
    monkeypatch.setattr(bench, "run_isolated", runner)
    monkeypatch.setattr(results, "append", lambda title, header, rows, **kw: table.update(rows=rows, **kw))
    monkeypatch.setattr(sys, "argv", ["train_step.py", "--runs", "fla", "trainer", "--seq-len", "8192", "--no-save"])
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exit_:
        bench.main()
    want = signal.SIGTERM if stop == "sigterm" else signal.SIGINT
    assert exit_.value.code == 128 + want
    assert [row[0] for row in table["rows"]] == ["fla RetNet-1.3b (flash-linear-attention)"]
    assert f"CUT SHORT by {want.name} after 1 of 2 runs" in table["notes"]
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_bench_stopped_in_its_first_run_writes_nothing(monkeypatch):
    from bench import results

    def runner(spec):
        raise KeyboardInterrupt

    written = []
    monkeypatch.setattr(bench, "run_isolated", runner)
    monkeypatch.setattr(results, "append", lambda *a, **kw: written.append(a))
    monkeypatch.setattr(sys, "argv", ["train_step.py", "--runs", "fla", "--seq-len", "8192", "--no-save"])
    with pytest.raises(SystemExit) as exit_:
        bench.main()
    assert exit_.value.code == 130 and not written

"""Export: consolidated safetensors from ZeRO-0 and ZeRO-3 checkpoints reproduce the trained model."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys

import pytest
import torch

from test_train_utils import REPO, env, evals, run_train


def _val_loss_of_export(out_dir, n_batches: int) -> float:
    from retnet_train.model import build_model
    from retnet_train.train.evaluate import lm_loss
    from retnet_train.train.synthetic import synthetic_val_batches

    model = build_model(out_dir).eval()
    batches = synthetic_val_batches(256, 64, 4, 0, 1, seed=1234, n_batches=n_batches)["synthetic"]
    with torch.no_grad():
        total = sum(float(lm_loss(model(b["input_ids"]), b["labels"], reduction="sum")) for b in batches)
    return total / sum(b["labels"].numel() for b in batches)


@pytest.mark.parametrize("stage,nproc", [(0, 1), pytest.param(3, 2, marks=pytest.mark.slow)])
def test_export_round_trip(tmp_path, stage, nproc):
    """The exported weights give the validation loss the trainer measured at the same step."""
    run = tmp_path / "run"
    run_train(run, "trainer.max_steps=3", f"deepspeed=zero{stage}", "trainer.eval_batches=2", nproc=nproc,
              launcher="torchrun" if nproc > 1 else "python")
    want = evals(run)[-1]
    assert want["step"] == 3
    out = tmp_path / "export"
    proc = subprocess.run([sys.executable, "-m", "retnet_train.export", str(run), str(out)], cwd=REPO,
                          env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "model.safetensors").is_file()
    cfg = json.loads((out / "model_config.json").read_text())
    assert (cfg["d_model"], cfg["n_layers"], cfg["vocab_size"]) == (64, 2, 256)
    got = _val_loss_of_export(out, n_batches=2 * nproc)  # eval_batches per rank x ranks
    assert abs(got - want["val/loss"]) < 1e-5, (got, want["val/loss"])


def _export_under_umask(run, out, umask: int) -> None:
    proc = subprocess.run([sys.executable, "-m", "retnet_train.export", str(run), str(out)], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=120, preexec_fn=lambda: os.umask(umask))
    assert proc.returncode == 0, proc.stderr[-3000:]


def _modes(folder) -> dict[str, int]:
    return {f.name: stat.S_IMODE(f.stat().st_mode) for f in sorted(folder.iterdir())}


def _data_root(root):
    """A data root as data=pile_c4_stack expects it (tokenizer.model, shards/<source>), tiny."""
    from data_fixtures import SHARD_WINDOWS, WINDOW, write_corpus
    from data_prep.shards import build_shards
    from data_prep.sources import expand_sources
    from data_prep.tokenizer import train_tokenizer

    sources = expand_sources(write_corpus(root / "raw").specs())
    tok = root / "data" / "tokenizer.model"
    train_tokenizer(str(tok), 400, sources, threads=1)
    build_shards(str(root / "data" / "shards"), str(tok), WINDOW, sources, workers=0,
                 shard_tokens=WINDOW * SHARD_WINDOWS, val_fraction=0.15)
    return root / "data"


def test_exported_files_have_the_mode_of_new_files(tmp_path):
    """Every file the export writes is readable like any new file (0o666 & ~umask), also when it
    replaces a private (0600) file of an earlier export: rewriting a file in place keeps its mode.
    Trained on shards, so the checkpoint names a tokenizer and the export copies it too."""
    data = _data_root(tmp_path)
    run = tmp_path / "run"
    run_train(run, "trainer.data_source=stream", "data=pile_c4_stack", f"data.root={data}", "data.num_workers=0",
              "trainer.max_steps=1", "deepspeed=zero0", "trainer.eval_at_end=false")
    names = ["model.safetensors", "model_config.json", "tokenizer.model"]

    old = tmp_path / "old_export"
    old.mkdir()
    for name in names:
        (old / name).write_bytes(b"")
        (old / name).chmod(0o600)
    _export_under_umask(run, old, 0o022)
    assert _modes(old) == {name: 0o644 for name in names}

    fresh = tmp_path / "fresh_export"
    _export_under_umask(run, fresh, 0o027)
    assert _modes(fresh) == {name: 0o640 for name in names}
    assert (fresh / "tokenizer.model").read_bytes() == (data / "tokenizer.model").read_bytes()


def test_export_of_a_missing_checkpoint_names_it(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "retnet_train.export", str(tmp_path / "nope"), str(tmp_path / "o")],
                          cwd=REPO, env=env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "nope" in proc.stderr and "not a checkpoint" in proc.stderr, proc.stderr


def test_export_into_a_run_dir_is_refused_and_generate_says_which_it_decodes(tmp_path):
    """An export written into a run_dir would be what generate loads from it, ahead of the run's newer
    checkpoints: refused; a folder that has both anyway gets a warning naming the one decoded."""
    run = tmp_path / "run"
    run_train(run, "trainer.max_steps=1", "deepspeed=zero0", "trainer.eval_at_end=false")
    proc = subprocess.run([sys.executable, "-m", "retnet_train.export", str(run), str(run)], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"out_dir {run} is a training run or checkpoint folder" in proc.stderr
    assert not (run / "model.safetensors").exists()

    from retnet_train.export import export

    export(run, tmp_path / "out")
    for name in ("model.safetensors", "model_config.json"):
        shutil.copy(tmp_path / "out" / name, run / name)  # as an export into it would have left them
    proc = subprocess.run([sys.executable, "-m", "retnet_train.generate", f"checkpoint={run}", "prompt_ids=[1,2]",
                           "max_new_tokens=2"], cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"{run} holds an export and a checkpoints/ folder; decoding the export" in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2])
def test_export_of_a_bf16_zero1_checkpoint_holds_the_master_weights(tmp_path, tp):
    """bf16 with ZeRO-1 saves DeepSpeed's BF16_Optimizer state (bf16_zero_* files, which its
    zero_to_fp32 cannot read). Over 2 data-parallel ranks parameters straddle the partitions; the
    export must hold every fp32 master weight whole: rounded to bf16, the weights the model trained with."""
    from safetensors.torch import load_file

    from retnet_train.parallel.tensor_parallel import merge_state_dicts

    run = tmp_path / "run"
    run_train(run, "trainer.max_steps=2", "trainer.precision=bf16", "deepspeed=zero1", f"parallel.tp={tp}",
              nproc=2 * tp, launcher="torchrun", timeout=400)
    ckpt = run / "checkpoints" / "step_00000002"
    assert len(list(ckpt.glob("bf16_zero_pp_rank_*_optim_states.pt"))) == 2 * tp
    proc = subprocess.run([sys.executable, "-m", "retnet_train.export", str(run), str(tmp_path / "out")], cwd=REPO,
                          env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    exported = load_file(str(tmp_path / "out" / "model.safetensors"))
    modules = [torch.load(ckpt / f"mp_rank_{r:02d}_model_states.pt", weights_only=False)["module"] for r in range(tp)]
    trained = merge_state_dicts(modules) if tp > 1 else modules[0]
    assert set(exported) == set(trained)  # retnet_tiny's head is untied: it is exported too
    for name, weight in exported.items():
        assert weight.dtype == torch.float32
        assert torch.equal(weight.to(torch.bfloat16), trained[name]), name
    # the fp32 masters, not the bf16 weights cast up: two AdamW steps leave bits below bf16's
    # precision in the trained matrices (a cast-up bf16 weight has none)
    finer = [n for n, w in exported.items() if w.dim() == 2 and not torch.equal(w, w.to(torch.bfloat16).float())]
    matrices = [n for n, w in exported.items() if w.dim() == 2]
    assert finer == matrices, f"no bits below bf16's precision: {sorted(set(matrices) - set(finer))}"

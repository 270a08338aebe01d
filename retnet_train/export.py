"""`python -m retnet_train.export CHECKPOINT OUT_DIR`: consolidated weights from any ZeRO stage.

CHECKPOINT is a checkpoint folder (run_dir/checkpoints/step_N), a checkpoints/ folder or a run_dir
(its `latest`). OUT_DIR receives model.safetensors (fp32, the optimizer's master weights for
ZeRO 1-3), model_config.json (the ModelConfig as JSON) and, when the run had one, tokenizer.model;
`retnet_train.model.build_model(OUT_DIR)` loads it. Checkpoints of tensor-parallel runs are merged
into one unsharded model, which `checkpoint.init_from=OUT_DIR` can start a run from at any
parallel.tp. Runs on CPU, no process group needed. Each file is written whole, then renamed into
place with the mode of any new file (0644 under umask 022).

With --hf, OUT_DIR is also a Hugging Face folder: `transformers.AutoModelForCausalLM.from_pretrained(
OUT_DIR, trust_remote_code=True)` and `AutoTokenizer` load it, with the model's own code copied in
(retnet_train/hf). model.safetensors then also holds lm_head.weight when it is the tied embedding.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

log = logging.getLogger(__name__)


def _tp_rank_state_dict(ckpt: Path, tp_rank: int, tp_size: int, zero_stage: int) -> dict[str, torch.Tensor]:
    """One tensor-parallel rank's weights, its ZeRO partitions gathered (fp32 master weights)."""
    mp = f"mp_rank_{tp_rank:02d}"
    if zero_stage == 0:
        path = ckpt / f"{mp}_model_states.pt"
        if not path.is_file():
            raise FileNotFoundError(f"{ckpt}: missing {path.name}")
        return torch.load(path, map_location="cpu", weights_only=False)["module"]
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # the files unpickle DeepSpeed objects
    bf16_files = sorted(ckpt.glob(f"bf16_zero_pp_rank_*_{mp}_optim_states.pt"))
    if bf16_files:  # bf16 with ZeRO-1: DeepSpeed's BF16_Optimizer, which zero_to_fp32 cannot read
        return _bf16_optimizer_state_dict(ckpt / f"{mp}_model_states.pt", bf16_files)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if tp_size == 1:
        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    # DeepSpeed's consolidation reads every *_optim_states.pt of a folder as one model's partitions:
    # give it a folder that shows only this tensor-parallel rank's files, under rank 00's names.
    with tempfile.TemporaryDirectory() as view:
        folder = Path(view) / ckpt.name
        folder.mkdir()
        files = [f for f in ckpt.iterdir() if mp in f.name]
        if not files:
            raise FileNotFoundError(f"{ckpt}: no files of tensor-parallel rank {tp_rank} ({mp}_*)")
        for f in files:
            (folder / f.name.replace(mp, "mp_rank_00")).symlink_to(f.resolve())
        return get_fp32_state_dict_from_zero_checkpoint(view, tag=ckpt.name)


def _bf16_optimizer_state_dict(model_states: Path, optim_files: list[Path]) -> dict[str, torch.Tensor]:
    """fp32 master weights of one tensor-parallel rank from BF16_Optimizer files, one per
    data-parallel rank: each holds a flat fp32 partition per parameter group and, per parameter,
    the fragment of it that lies in that partition (start, numel); a parameter is its fragments
    in data-parallel rank order."""
    def dp_rank(f: Path) -> int:
        return int(f.name.split("_pp_rank_")[1].split("_")[0])

    shapes = torch.load(model_states, map_location="cpu", weights_only=False)["param_shapes"]
    fragments: dict[str, list[torch.Tensor]] = {}
    for f in sorted(optim_files, key=dp_rank):
        sd = torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        for flat, mapping in zip(sd["single_partition_of_fp32_groups"], sd["param_slice_mappings"]):
            for name, where in mapping.items():
                fragments.setdefault(name, []).append(flat.narrow(0, where.start, where.numel))
    state = {}
    for group in shapes:
        for name, shape in group.items():
            pieces = fragments.get(name)
            if not pieces or sum(p.numel() for p in pieces) != torch.Size(shape).numel():
                raise ValueError(f"{model_states.parent}: parameter {name} {tuple(shape)} is not complete in "
                                 f"{[f.name for f in optim_files]} (fragments: {[p.numel() for p in pieces or []]})")
            state[name] = torch.cat(pieces).view(shape).clone()
    return state


def consolidated_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """Full fp32 state dict of the model in a checkpoint folder written by the trainer: ZeRO
    partitions gathered per tensor-parallel rank, then the tensor-parallel shards merged."""
    from retnet_train.parallel.tensor_parallel import merge_state_dicts

    meta = json.loads((ckpt / "meta.json").read_text())
    tp = int(meta.get("tp_size", 1))
    shards = [_tp_rank_state_dict(ckpt, r, tp, int(meta.get("zero_stage", 0))) for r in range(tp)]
    state = shards[0] if tp == 1 else merge_state_dicts(shards)
    return {k: v.detach().to(torch.float32).contiguous() for k, v in state.items()}


def model_config_of(ckpt: Path):
    from retnet_train.model import resolve_config

    return resolve_config(json.loads((ckpt / "meta.json").read_text())["model_config"])


def _umask() -> int:
    # reading the umask means setting it: put it straight back (not thread-safe; the CLI has one thread)
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def _output_file(dest: Path) -> Iterator[Path]:
    """A temporary path next to dest to write to; on success it becomes dest, with the mode of a
    normally created file (0o666 & ~umask). Every file of an export goes through here: safetensors
    writes through a private (0600) temp file, and rewriting an existing file would keep its mode,
    so the mode is set, not inherited; the rename means a reader never sees a half-written file."""
    part = dest.with_name(dest.name + ".part")
    try:
        yield part
        os.chmod(part, 0o666 & ~_umask())
        os.replace(part, dest)
    finally:
        part.unlink(missing_ok=True)


class ExportError(ValueError):
    """An export that would not be what the user asked for (its message says why)."""


def export(checkpoint: str | Path, out_dir: str | Path, hf: bool = False) -> Path:
    from retnet_train.progress import phase
    from retnet_train.train.checkpoint import resolve_checkpoint

    out = Path(out_dir)
    if (out / "checkpoints").is_dir() or (out / "meta.json").is_file():
        # an export inside a run_dir would be what generate and lm_eval load from it, ahead of the
        # run's newer checkpoints
        raise ExportError(f"out_dir {out} is a training run or checkpoint folder: export into a folder of its own")
    ckpt = resolve_checkpoint(checkpoint)
    meta = json.loads((ckpt / "meta.json").read_text())
    tokenizer = meta.get("tokenizer")
    # two long silent steps for a large model (gathering ZeRO partitions; writing GBs): say which runs
    with phase(f"export: gathering the model of {ckpt}"):
        state = consolidated_state_dict(ckpt)
    with phase(f"export: writing {out_dir}"):
        return write_export(state, model_config_of(ckpt), out_dir,
                            tokenizer if tokenizer and Path(tokenizer).is_file() else None,
                            {"step": str(meta["step"]), "source": str(ckpt)}, hf=hf)


def write_export(state: dict[str, torch.Tensor], cfg, out_dir: str | Path, tokenizer: str | Path | None = None,
                 metadata: dict[str, str] | None = None, hf: bool = False) -> Path:
    """An export folder of a model's fp32 state dict and its ModelConfig (and, with hf, its
    Hugging Face files)."""
    import dataclasses

    from safetensors.torch import save_file

    state = dict(state)
    if cfg.tie_embeddings:
        # safetensors refuses shared storage; build_model re-ties it. transformers would count a
        # missing lm_head.weight as untrained, so a Hugging Face folder stores a copy
        if hf:
            state["lm_head.weight"] = state["embed.weight"].clone()
        else:
            state.pop("lm_head.weight", None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with _output_file(out / "model.safetensors") as part:
        save_file(state, str(part), metadata=metadata)
    with _output_file(out / "model_config.json") as part:
        part.write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    if tokenizer:
        with _output_file(out / "tokenizer.model") as part:
            shutil.copyfile(tokenizer, part)
    if hf:
        from retnet_train.hf.folder import hf_files

        for name, text in hf_files(cfg, out / "tokenizer.model" if tokenizer else None).items():
            with _output_file(out / name) as part:
                part.write_text(text)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m retnet_train.export", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="checkpoint folder, checkpoints/ folder, or run_dir")
    p.add_argument("out_dir")
    p.add_argument("--hf", action="store_true",
                   help="also write a Hugging Face folder (AutoModelForCausalLM / AutoTokenizer, trust_remote_code)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from retnet_train.train.checkpoint import CheckpointError

    try:  # a missing or damaged checkpoint: one line naming it, not a traceback
        out = export(args.checkpoint, args.out_dir, hf=args.hf)
    except (CheckpointError, ExportError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from safetensors.torch import load_file

    n = sum(t.numel() for t in load_file(str(out / "model.safetensors")).values())
    print(f"exported {n / 1e6:.2f}M parameters to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`python -m retnet_train.export CHECKPOINT OUT_DIR`: consolidated weights from any ZeRO stage.

CHECKPOINT is a checkpoint folder (run_dir/checkpoints/step_N), a checkpoints/ folder or a run_dir
(its `latest`). OUT_DIR receives model.safetensors (fp32, the optimizer's master weights for
ZeRO 1-3), model_config.json (the ModelConfig as JSON) and, when the run had one, tokenizer.model;
`retnet_train.model.build_model(OUT_DIR)` loads it. Runs on CPU, no process group needed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def consolidated_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """Full fp32 state dict of the model in a checkpoint folder written by the trainer."""
    meta = json.loads((ckpt / "meta.json").read_text())
    if meta.get("zero_stage", 0) == 0:
        files = sorted(ckpt.glob("mp_rank_*_model_states.pt"))
        if len(files) != 1:
            raise FileNotFoundError(f"{ckpt}: expected one mp_rank_*_model_states.pt, found {len(files)}")
        state = torch.load(files[0], map_location="cpu", weights_only=False)["module"]
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    return {k: v.detach().to(torch.float32).contiguous() for k, v in state.items()}


def model_config_of(ckpt: Path):
    from retnet_train.model import resolve_config

    return resolve_config(json.loads((ckpt / "meta.json").read_text())["model_config"])


def export(checkpoint: str | Path, out_dir: str | Path) -> Path:
    import dataclasses

    from safetensors.torch import save_file

    from retnet_train.train.checkpoint import resolve_checkpoint

    ckpt = resolve_checkpoint(checkpoint)
    meta = json.loads((ckpt / "meta.json").read_text())
    cfg = model_config_of(ckpt)
    state = consolidated_state_dict(ckpt)
    if cfg.tie_embeddings:  # safetensors refuses shared storage; build_model re-ties it
        state.pop("lm_head.weight", None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors.part"), metadata={"step": str(meta["step"]),
                                                                   "source": str(ckpt)})
    os.replace(out / "model.safetensors.part", out / "model.safetensors")
    (out / "model_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    tokenizer = meta.get("tokenizer")
    if tokenizer and Path(tokenizer).is_file():
        shutil.copyfile(tokenizer, out / "tokenizer.model")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m retnet_train.export", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="checkpoint folder, checkpoints/ folder, or run_dir")
    p.add_argument("out_dir")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = export(args.checkpoint, args.out_dir)
    from safetensors.torch import load_file

    n = sum(t.numel() for t in load_file(str(out / "model.safetensors")).values())
    print(f"exported {n / 1e6:.2f}M parameters to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

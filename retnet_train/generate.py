"""`python -m retnet_train.generate checkpoint=PATH prompt="..." max_new_tokens=N [key=value ...]`

Decodes with the recurrent form (O(1) memory per token) after a chunkwise prefill of the prompt.
PATH: an export folder (model_config.json + model.safetensors), a checkpoint folder, or a run_dir.
Keys: prompt, prompt_ids (token ids instead of text), max_new_tokens, temperature (0: greedy),
top_k (0: off), top_p (1.0: off), seed, num_samples, tokenizer (a sentencepiece .model; default:
the one exported with the model or recorded in the checkpoint), device, chunk_size.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import torch
from torch import Tensor


@dataclass
class GenerateConfig:
    checkpoint: str = "???"
    prompt: str = ""
    prompt_ids: Optional[List[int]] = None
    max_new_tokens: int = 64
    temperature: float = 0.8
    top_k: int = 50
    top_p: float = 0.95
    seed: int = 0
    num_samples: int = 1
    tokenizer: Optional[str] = None
    device: str = "auto"
    chunk_size: Optional[int] = None
    stop_at_eos: bool = True


def sample_next(logits: Tensor, temperature: float, top_k: int, top_p: float, generator=None) -> Tensor:
    """logits [B, V] -> next ids [B]; greedy when temperature == 0."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, prompt_ids: Tensor, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, eos_id: Optional[int] = None, chunk_size: Optional[int] = None,
             generator=None) -> Tensor:
    """prompt_ids [B, T] -> new ids [B, <= max_new_tokens]: prefill once, then one token per step."""
    model.eval()
    mode = "chunkwise" if model.config.arch == "retnet" else "parallel"
    kwargs = {"chunk_size": chunk_size} if mode == "chunkwise" and chunk_size else {}
    logits, state = model(prompt_ids, mode=mode, return_state=True, **kwargs)
    last = logits[:, -1]
    out = []
    done = torch.zeros(prompt_ids.size(0), dtype=torch.bool, device=prompt_ids.device)
    for _ in range(max_new_tokens):
        nxt = sample_next(last, temperature, top_k, top_p, generator)
        out.append(nxt)
        if eos_id is not None:
            done |= nxt == eos_id
            if bool(done.all()):
                break
        logits, state = model.step(nxt[:, None], state)
        last = logits[:, -1]
    return torch.stack(out, dim=1) if out else prompt_ids.new_zeros(prompt_ids.size(0), 0)


def load_for_inference(path: str | Path, device: torch.device):
    """(model, tokenizer path or None) from an export folder, a checkpoint folder or a run_dir."""
    from retnet_train.model import EXPORT_CONFIG, build_model

    p = Path(path)
    if (p / EXPORT_CONFIG).is_file():
        model = build_model(p)
        tok = p / "tokenizer.model"
        return model.to(device), (str(tok) if tok.is_file() else None)
    from retnet_train.export import consolidated_state_dict, model_config_of
    from retnet_train.train.checkpoint import resolve_checkpoint

    ckpt = resolve_checkpoint(p)
    cfg = model_config_of(ckpt)
    model = build_model(cfg)
    state = consolidated_state_dict(ckpt)
    if cfg.tie_embeddings:
        state.setdefault("lm_head.weight", state["embed.weight"])
    model.load_state_dict(state)
    tok = json.loads((ckpt / "meta.json").read_text()).get("tokenizer")
    return model.to(device), (tok if tok and Path(tok).is_file() else None)


def parse_args(argv: list[str]) -> GenerateConfig:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    schema = OmegaConf.structured(GenerateConfig)
    try:
        cfg = OmegaConf.merge(schema, OmegaConf.from_dotlist(argv))
        if OmegaConf.is_missing(cfg, "checkpoint"):
            raise ValueError("checkpoint=PATH is required")
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise ValueError(str(e)) from None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    try:
        cfg = parse_args(argv)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    model, tok_path = load_for_inference(cfg.checkpoint, device)
    tok_path = cfg.tokenizer or tok_path
    sp = None
    if tok_path:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=tok_path)
    if cfg.prompt_ids is not None:
        ids = list(cfg.prompt_ids)
    elif sp is not None:
        ids = [sp.bos_id()] + sp.encode(cfg.prompt)
    else:
        print("error: no tokenizer found: pass tokenizer=PATH or prompt_ids=[...]", file=sys.stderr)
        return 2
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    prompt = torch.tensor([ids] * cfg.num_samples, device=device)
    new = generate(model, prompt, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p,
                   eos_id=sp.eos_id() if (sp is not None and cfg.stop_at_eos) else None,
                   chunk_size=cfg.chunk_size, generator=g)
    for row in new.tolist():
        if sp is not None and cfg.prompt_ids is None:
            eos = sp.eos_id()
            row = row[: row.index(eos)] if eos in row else row
            print(cfg.prompt + sp.decode(row))
        else:
            print(" ".join(map(str, row)))
        if cfg.num_samples > 1:
            print("-" * 40)
    return 0


if __name__ == "__main__":
    sys.exit(main())

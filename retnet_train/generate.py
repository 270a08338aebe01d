"""`python -m retnet_train.generate checkpoint=PATH prompt="..." max_new_tokens=N [key=value ...]`

Decodes with the recurrent form (O(1) memory per token) after a chunkwise prefill of the prompt.
PATH: an export folder (model_config.json + model.safetensors), a checkpoint folder, or a run_dir.
Keys: prompt, prompt_file, prompt_ids (token ids instead of text), max_new_tokens, temperature
(0: greedy), top_k (0: off), top_p (1.0: off), seed, num_samples, tokenizer (a sentencepiece .model;
default: the one exported with the model or recorded in the checkpoint), device, chunk_size,
stop_at_eos.

prompt=TEXT is taken literally: everything after the first `=`, trailing spaces, colons, quotes,
`true` and `123` included (prompt="def " keeps its space). prompt_file=PATH is a UTF-8 text file
with one prompt per line: empty lines are skipped, line ends removed, other whitespace kept; each
prompt is generated in turn (with the same seed, so a prompt gives what prompt=TEXT would give)
and printed, outputs separated by a line of dashes when there are several (several prompts or
num_samples > 1). Pass one of prompt and prompt_file (prompt_ids replaces prompt, and cannot go
with prompt_file). The prompt_file path is taken literally too; other values are parsed as YAML
(max_new_tokens=64 is a number, prompt_ids=[1,2,3] a list).
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
    prompt_file: Optional[str] = None
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
    # built on the device it runs on: model.kernels=auto resolves for that device (fla/Triton on a GPU)
    if (p / EXPORT_CONFIG).is_file():
        with torch.device(device):
            model = build_model(p)
        tok = p / "tokenizer.model"
        return model, (str(tok) if tok.is_file() else None)
    from retnet_train.export import consolidated_state_dict, model_config_of
    from retnet_train.train.checkpoint import resolve_checkpoint

    ckpt = resolve_checkpoint(p)
    import dataclasses

    # the training run's kernel choice (fla, say) is about its device, not the weights: decode with
    # what this device has
    cfg = dataclasses.replace(model_config_of(ckpt), kernels="auto")
    with torch.device(device):
        model = build_model(cfg)
    state = consolidated_state_dict(ckpt)
    if cfg.tie_embeddings:
        state.setdefault("lm_head.weight", state["embed.weight"])
    model.load_state_dict(state)
    tok = json.loads((ckpt / "meta.json").read_text()).get("tokenizer")
    return model, (tok if tok and Path(tok).is_file() else None)


# Values of these keys are text, taken byte for byte: OmegaConf.from_dotlist would parse them as
# YAML ("def fib(n):" becomes a mapping, "def " loses its space, "true" becomes True).
LITERAL_KEYS = ("prompt", "prompt_file")
SEPARATOR = "-" * 40


def _split_literal(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """({key: text} for LITERAL_KEYS, the other arguments for OmegaConf)."""
    literal, rest = {}, []
    for arg in argv:
        key, eq, value = arg.partition("=")
        if eq and key in LITERAL_KEYS:
            literal[key] = value
        else:
            rest.append(arg)
    return literal, rest


def parse_args(argv: list[str]) -> GenerateConfig:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    literal, rest = _split_literal(argv)
    if "prompt" in literal and "prompt_file" in literal:
        raise ValueError(f"prompt={literal['prompt']!r} and prompt_file={literal['prompt_file']!r} "
                         "both given: pass one of them")
    schema = OmegaConf.structured(GenerateConfig)
    try:
        cfg = OmegaConf.merge(schema, OmegaConf.from_dotlist(rest))
        if OmegaConf.is_missing(cfg, "checkpoint"):
            raise ValueError("checkpoint=PATH is required")
        out = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise ValueError(str(e)) from None
    for key, value in literal.items():
        setattr(out, key, value)
    if out.prompt_file is not None and out.prompt_ids is not None:
        raise ValueError(f"prompt_file={out.prompt_file!r} and prompt_ids={out.prompt_ids} both given: "
                         "pass one of them")
    return out


def read_prompt_file(path: str) -> list[str]:
    """The prompts of a prompt_file: one per line, empty lines skipped, line ends removed."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"prompt_file={path!r}: cannot read it as UTF-8 text ({e})") from None
    # split on \n only: str.splitlines would also cut a prompt at form feeds and other separators
    prompts = [line.removesuffix("\r") for line in text.split("\n")]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ValueError(f"prompt_file={path!r}: no prompts (the file is empty or has only empty lines)")
    return prompts


def prompts_of(cfg: GenerateConfig) -> list[str]:
    return read_prompt_file(cfg.prompt_file) if cfg.prompt_file is not None else [cfg.prompt]


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _load_tokenizer(path: Optional[str]):
    if not path:
        return None
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=path)


def _generate_rows(model, ids: list[int], cfg: GenerateConfig, eos_id: Optional[int],
                   device: torch.device) -> list[list[int]]:
    # seeded per prompt: a prompt of a prompt_file gives what prompt=TEXT alone gives
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    prompt = torch.tensor([ids] * cfg.num_samples, device=device)
    new = generate(model, prompt, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p,
                   eos_id=eos_id, chunk_size=cfg.chunk_size, generator=g)
    return new.tolist()


def _text_of(prompt: str, row: list[int], sp) -> str:
    eos = sp.eos_id()
    row = row[: row.index(eos)] if eos in row else row
    # the embedding is padded to a multiple of 128 past the tokenizer's pieces: a barely trained
    # model can sample those ids, which have no text (sentencepiece would raise on them)
    row = [i for i in row if i < sp.get_piece_size()]
    return prompt + sp.decode(row)  # the prompt as given, not a decode of its tokens


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    try:
        cfg = parse_args(argv)
        prompts = prompts_of(cfg)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from retnet_train.train.checkpoint import CheckpointError

    device = _device(cfg.device)
    try:  # a missing or damaged checkpoint: one line naming it, not a traceback
        model, tok_path = load_for_inference(cfg.checkpoint, device)
    except (CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sp = _load_tokenizer(cfg.tokenizer or tok_path)
    if cfg.prompt_ids is None and sp is None:
        print("error: no tokenizer found: pass tokenizer=PATH or prompt_ids=[...]", file=sys.stderr)
        return 2
    eos_id = sp.eos_id() if (sp is not None and cfg.stop_at_eos) else None
    separate = len(prompts) * cfg.num_samples > 1
    for prompt in prompts:
        ids = list(cfg.prompt_ids) if cfg.prompt_ids is not None else [sp.bos_id()] + sp.encode(prompt)
        for row in _generate_rows(model, ids, cfg, eos_id, device):
            print(_text_of(prompt, row, sp) if cfg.prompt_ids is None else " ".join(map(str, row)))
            if separate:
                print(SEPARATOR)
    return 0


if __name__ == "__main__":
    sys.exit(main())

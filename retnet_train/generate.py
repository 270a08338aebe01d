"""`python -m retnet_train.generate checkpoint=PATH prompt="..." max_new_tokens=N [key=value ...]`

Decodes through the inference engine (retnet_train.inference.Generator): a chunkwise prefill of
the prompts, then the recurrent form (O(1) memory per token), batch_size prompts at a time, in CUDA
graphs on a GPU. PATH: an export folder (model_config.json + model.safetensors), a checkpoint
folder, or a run_dir. Keys: prompt, prompt_file, prompt_ids (token ids instead of text),
max_new_tokens, temperature (0: greedy), top_k (0: off), top_p (1.0: off), seed, num_samples,
batch_size, stream (print a single output's text as it is generated), tokenizer (a sentencepiece
.model; default: the one exported with the model or recorded in the checkpoint), device,
chunk_size, stop_at_eos, state_window (RetNet: the state written back once every N tokens; null:
the engine's default, 4 on a GPU). The decoding speed (new tokens/s) goes to stderr at the end.

prompt=TEXT is taken literally: everything after the first `=`, trailing spaces, colons, quotes,
`true` and `123` included (prompt="def " keeps its space). prompt_file=PATH is a UTF-8 text file
with one prompt per line: empty lines are skipped, line ends removed, other whitespace kept; its
prompts are decoded batch_size at a time and printed in order. Sample j of any prompt draws its
random numbers from (seed, j) whatever batch it runs in, so a prompt of a prompt_file gives what
prompt=TEXT gives. Outputs are separated by a line of dashes when there are several (several
prompts or num_samples > 1). Pass one of prompt and prompt_file (prompt_ids replaces prompt, and cannot go
with prompt_file). The prompt_file path is taken literally too; other values are parsed as YAML
(max_new_tokens=64 is a number, prompt_ids=[1,2,3] a list).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import torch
from torch import Tensor

from retnet_train.progress import Bar


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
    batch_size: int = 8
    stream: bool = True
    tokenizer: Optional[str] = None
    device: str = "auto"
    chunk_size: Optional[int] = None
    stop_at_eos: bool = True
    state_window: Optional[int] = None


@torch.no_grad()
def generate(model, prompt_ids: Tensor, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, eos_id: Optional[int] = None, chunk_size: Optional[int] = None,
             seed: int = 0) -> Tensor:
    """prompt_ids [B, T] -> new ids [B, <= max_new_tokens]: prefill once, then one token per step.

    The plain eager loop (a growing state, a host check per token): the reference the inference
    engine (retnet_train.inference.Generator) is tested against; it samples the same way (row i
    draws from (seed, i)), and a finished row repeats eos_id."""
    from retnet_train.inference.sampling import SamplingSettings

    model.eval()
    B = prompt_ids.size(0)
    settings = SamplingSettings(B, prompt_ids.device)
    settings.set(temperature, top_k, top_p, seed)
    mode = "chunkwise" if model.config.arch == "retnet" else "parallel"
    kwargs = {"chunk_size": chunk_size} if mode == "chunkwise" and chunk_size else {}
    logits, state = model(prompt_ids, mode=mode, return_state=True, **kwargs)
    last = logits[:, -1]
    out = []
    done = torch.zeros(B, dtype=torch.bool, device=prompt_ids.device)
    for i in range(max_new_tokens):
        nxt = settings.sample(last, torch.tensor(i, device=prompt_ids.device))
        if eos_id is not None:
            nxt = torch.where(done, eos_id, nxt)
            done |= nxt == eos_id
        out.append(nxt)
        if eos_id is not None and bool(done.all()):
            break
        if i + 1 < max_new_tokens:
            logits, state = model.step(nxt[:, None], state)
            last = logits[:, -1]
    return torch.stack(out, dim=1) if out else prompt_ids.new_zeros(B, 0)


def load_for_inference(path: str | Path, device: torch.device):
    """(model, tokenizer path or None) from an export folder, a checkpoint folder or a run_dir."""
    from retnet_train.model import EXPORT_CONFIG, build_model

    p = Path(path)
    # built on the device it runs on: model.kernels=auto resolves for that device (fla/Triton on a GPU)
    if (p / EXPORT_CONFIG).is_file():
        if (p / "checkpoints").is_dir():  # say which of the two is decoded
            print(f"warning: {p} holds an export and a checkpoints/ folder; decoding the export "
                  f"(pass {p / 'checkpoints'} for the newest checkpoint)", file=sys.stderr)
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
    # checked before the model loads (minutes for a large one), not where each is first used
    if out.chunk_size is not None and out.chunk_size < 1:
        raise ValueError(f"chunk_size={out.chunk_size} must be >= 1 (or null: the model's)")
    if out.state_window is not None and out.state_window < 1:
        raise ValueError(f"state_window={out.state_window} must be >= 1 (or null: the engine's default)")
    if out.tokenizer is not None and not Path(out.tokenizer).is_file():
        raise ValueError(f"tokenizer={out.tokenizer!r}: no such file")
    if out.device not in ("auto", "cpu", "cuda") and not out.device.startswith("cuda:"):
        raise ValueError(f"device={out.device!r} must be auto, cpu, cuda or cuda:N")
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


def _generate_all(model, jobs: list[tuple[list[int], int]], cfg: GenerateConfig, eos_id: Optional[int],
                  on_token=None) -> list[list[int]]:
    """New ids for each (prompt ids, sample index) job, batch_size jobs per engine call."""
    from retnet_train.inference import Generator

    longest = max(len(ids) for ids, _ in jobs)
    gen = Generator(model, max_batch=min(cfg.batch_size, len(jobs)), max_len=longest + max(cfg.max_new_tokens, 1),
                    chunk_size=cfg.chunk_size, state_window=cfg.state_window)
    rows = []
    # A streamed output is its own progress; otherwise a bar over the decoding steps of all calls
    # (it ends short of its total where every row stops at eos).
    bar = Bar("generating", total=-(-len(jobs) // gen.max_batch) * cfg.max_new_tokens, unit="steps",
              enabled=on_token is None)
    with bar:
        for start in range(0, len(jobs), gen.max_batch):
            batch = jobs[start:start + gen.max_batch]
            rows += gen.generate([ids for ids, _ in batch], cfg.max_new_tokens, cfg.temperature, cfg.top_k,
                                 cfg.top_p, eos_id=eos_id, seed=cfg.seed, streams=[j for _, j in batch],
                                 on_token=on_token or (lambda _ids: bar.update()))
    return rows


class _TextStream:
    """Prints one output's text as its tokens arrive: what is decoded so far, less a trailing
    incomplete character, then the rest at the end."""

    def __init__(self, prompt: str, sp):
        self.prompt, self.sp, self.ids, self.shown = prompt, sp, [], ""
        print(prompt, end="", flush=True)

    def __call__(self, step_ids) -> None:
        self.ids.append(int(step_ids[0]))
        text = _text_of("", self.ids, self.sp).rstrip("\ufffd")
        if text.startswith(self.shown) and len(text) > len(self.shown):
            print(text[len(self.shown):], end="", flush=True)
            self.shown = text

    def finish(self, row: list[int]) -> None:
        text = _text_of("", row, self.sp)
        print(text[len(self.shown):] if text.startswith(self.shown) else "", flush=True)


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
    if cfg.batch_size < 1 or cfg.num_samples < 1:
        print(f"error: batch_size={cfg.batch_size} and num_samples={cfg.num_samples} must be >= 1", file=sys.stderr)
        return 2
    texts, jobs = [], []
    for prompt in prompts:
        ids = list(cfg.prompt_ids) if cfg.prompt_ids is not None else [sp.bos_id()] + sp.encode(prompt)
        for j in range(cfg.num_samples):
            texts.append(prompt)
            jobs.append((ids, j))
    separate = len(jobs) > 1
    streaming = cfg.stream and not separate and cfg.prompt_ids is None
    live = _TextStream(texts[0], sp) if streaming else None
    start = time.perf_counter()
    try:
        rows = _generate_all(model, jobs, cfg, eos_id, on_token=live)
    except ValueError as e:  # a prompt too long, token ids outside the vocabulary
        print(f"\nerror: {e}" if live else f"error: {e}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    for prompt, row in zip(texts, rows):
        if live is not None:
            live.finish(row)
        else:
            print(_text_of(prompt, row, sp) if cfg.prompt_ids is None else " ".join(map(str, row)))
        if separate:
            print(SEPARATOR)
    new = sum(len(r) for r in rows)
    print(f"{new} new tokens in {seconds:.2f} s ({new / max(seconds, 1e-9):.1f} tokens/s, prefill included, "
          f"batch_size={min(cfg.batch_size, len(jobs))})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The lm-evaluation-harness model `retnet_train`: a checkpoint, run_dir or export folder evaluated
by our own model and tokenizer (no transformers involved).

    python -m retnet_train.lm_eval --model retnet_train --model_args checkpoint=PATH --tasks ...

(lm-eval's own `lm_eval` command cannot find models outside its package: retnet_train.lm_eval is
that command with this module imported first.) model_args: checkpoint (required), tokenizer (a
sentencepiece .model; default: the one exported or recorded with the model), max_length (tokens of
context per scored window, default 2048), chunk_size (of generation's chunkwise prefill); the
harness's --batch_size and --device ("auto": CUDA when there is one) are honoured.

Texts are encoded as training encoded documents: [bos] + sentencepiece.encode(text). Scoring runs
the parallel form on right-padded batches (padding after a token cannot change its logits: every
form is causal), sorted by length so that a batch pads little.
"""

from __future__ import annotations

import logging
from typing import Iterable

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

log = logging.getLogger(__name__)

DEFAULT_BATCH = 8


def _batch_size(value) -> int:
    if value is None or str(value).startswith("auto"):
        if value is not None:
            log.warning("batch_size=%s: no automatic search here; using %d", value, DEFAULT_BATCH)
        return DEFAULT_BATCH
    try:
        size = int(value)
    except ValueError:
        raise ValueError(f"batch_size={value!r} is not a positive integer") from None
    if size < 1:
        raise ValueError(f"batch_size={value!r} is not a positive integer")
    return size


@register_model("retnet_train")
class RetNetTrainLM(LM):
    def __init__(self, checkpoint: str, tokenizer: str | None = None, max_length: int = 2048,
                 chunk_size: int | None = None, batch_size=None, max_batch_size=None, device: str | None = None):
        super().__init__()
        import sentencepiece as spm

        from retnet_train.generate import load_for_inference

        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu") if device in (None, "auto") else \
            torch.device(device)
        self.model, tok_path = load_for_inference(checkpoint, dev)
        self.model.eval()
        tok_path = tokenizer or tok_path
        if not tok_path:
            raise ValueError(f"{checkpoint}: no tokenizer exported or recorded with it: pass model_args tokenizer=PATH")
        self.sp = spm.SentencePieceProcessor(model_file=str(tok_path))
        self.max_length = int(max_length)
        if self.max_length < 2:
            raise ValueError(f"max_length={max_length} must be at least 2 tokens")
        self.chunk_size = int(chunk_size) if chunk_size is not None else None
        self.batch_size = _batch_size(batch_size)
        self._device = dev

    @property
    def device(self):
        return self._device

    # ---- scoring ------------------------------------------------------------------------------

    def _encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    @torch.no_grad()
    def score_tokens(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(context ids, continuation ids) -> (sum of log p(continuation | context), whether each
        continuation token is the argmax). The context is cut from the left to fit max_length."""
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        windows = []
        for context, cont in pairs:
            if not cont:
                raise ValueError("an empty continuation has no likelihood to compute")
            ids = (context + cont)[-(self.max_length + 1):][:-1]  # the inputs; the last token is only predicted
            windows.append((ids, cont))
        order = sorted(range(len(pairs)), key=lambda i: -len(windows[i][0]))
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            longest = len(windows[rows[0]][0])
            batch = torch.full((len(rows), longest), self.sp.pad_id() if self.sp.pad_id() >= 0 else 0,
                               dtype=torch.long)
            for r, i in enumerate(rows):
                ids = windows[i][0]
                batch[r, :len(ids)] = torch.tensor(ids)
            logp = F.log_softmax(self.model(batch.to(self.device)).float(), dim=-1)
            for r, i in enumerate(rows):
                ids, cont = windows[i]
                n = len(cont)  # its tokens are predicted at the last n positions of this row's inputs
                target = torch.tensor(cont, device=self.device)
                row = logp[r, len(ids) - n:len(ids)]
                results[i] = (float(row.gather(1, target[:, None]).sum()), bool((row.argmax(-1) == target).all()))
        return results

    def _context_and_continuation(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        bos = [self.sp.bos_id()]
        if not context:
            return bos, self._encode(continuation)
        # a context's trailing spaces belong to the continuation's first word (sentencepiece joins
        # a space to the word after it): encode the whole text and split off the context's tokens
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self._encode(context + continuation)
        n_context = len(self._encode(context))
        return bos + whole[:n_context], whole[n_context:]

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return self.score_tokens([self._context_and_continuation(*req.args) for req in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The whole text's log-likelihood, [bos] first, in windows of max_length tokens."""
        pairs, owner = [], []
        for i, req in enumerate(requests):
            windows = get_rolling_token_windows(self._encode(req.args[0]), prefix_token=self.sp.bos_id(),
                                                max_seq_len=self.max_length, context_len=1)
            for window in map(make_disjoint_window, windows):
                pairs.append(window)
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logp, _) in zip(owner, self.score_tokens(pairs)):
            totals[i] += logp
        return totals

    # ---- generation ---------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with do_sample / temperature) continuations, cut at the first stop
        string; max_gen_toks (default 256) new tokens at most. The inference engine decodes a batch
        of prompts of any lengths together: a chunkwise prefill, then the recurrent form."""
        from retnet_train.inference import Generator

        outputs: list[str | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(self._settings(req.args[1]), []).append(i)
        for (until, max_new, temperature), members in groups.items():
            for start in range(0, len(members), self.batch_size):
                rows = members[start:start + self.batch_size]
                prompts = [([self.sp.bos_id()] + self._encode(requests[i].args[0]))[-(self.max_length - max_new):]
                           for i in rows]
                gen = Generator(self.model, max_batch=len(rows), max_len=max(map(len, prompts)) + max_new,
                                chunk_size=self.chunk_size)
                new = gen.generate(prompts, max_new, temperature=temperature, eos_id=self.sp.eos_id())
                for i, ids in zip(rows, new):
                    outputs[i] = _cut(self._decode(ids), until)
        return outputs

    def _settings(self, kwargs: dict) -> tuple[tuple[str, ...], int, float]:
        kwargs = dict(kwargs or {})
        until = kwargs.pop("until", None) or []
        until = (until,) if isinstance(until, str) else tuple(until)
        max_new = int(kwargs.pop("max_gen_toks", 256))
        if max_new >= self.max_length:
            raise ValueError(f"max_gen_toks={max_new} leaves no room for a prompt in max_length={self.max_length}")
        do_sample = bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", 1.0 if do_sample else 0.0))
        temperature = temperature if do_sample or temperature > 0 else 0.0
        if kwargs:
            log.warning("generation arguments not supported here, ignored: %s", sorted(kwargs))
        return until, max_new, temperature

    def _decode(self, ids: Iterable[int]) -> str:
        eos, pieces = self.sp.eos_id(), self.sp.get_piece_size()
        ids = list(ids)
        ids = ids[: ids.index(eos)] if eos in ids else ids
        return self.sp.decode([i for i in ids if i < pieces])  # padded vocabulary ids have no text


def _cut(text: str, until: tuple[str, ...]) -> str:
    for stop in until:
        if stop and stop in text:
            text = text[: text.index(stop)]
    return text

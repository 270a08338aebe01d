"""The inference engine: preallocated decoding state, batched prefill, and a decoding step that
runs on the device with no host synchronisation per token (replayed from a CUDA graph on a GPU).

    gen = Generator(model, max_batch=16, max_len=4096)
    outs = gen.generate([[1, 5, 9], [1, 7]], max_new_tokens=64, temperature=0.0)

Per layer the state is a preallocated buffer for max_batch sequences (RetNet: fp32 [B, H, d_k, d_v];
Transformer: a static KV cache [B, max_len, H, D]) that each step updates in place. Every sequence
keeps its own position, so prompts of different lengths share a batch and a prompt decodes the
same alone or in any batch. A call of n prompts runs in the smallest batch bucket (a power of two,
or max_batch) that holds them; each bucket's step is captured once as a CUDA graph and replayed.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from retnet_train.model.lm import State
from retnet_train.model.retention_state import DEFAULT_WINDOW
from retnet_train.model.transformer import StaticKVCache

from .graphs import StepGraphs
from .sampling import SamplingSettings

log = logging.getLogger(__name__)

# how often the host looks at the stop flags (one synchronisation every this many tokens)
STOP_CHECK_EVERY = 16
# RetNet's state written back once every this many tokens where the one-kernel step runs
STATE_WINDOW = DEFAULT_WINDOW


class Generator:
    """Batched decoding with one model (RetNet or the Transformer baseline).

    max_batch: the most prompts one generate call takes. max_len: prompt plus new tokens of any
    sequence; it sizes the Transformer's KV cache (RetNet's state does not grow, so for RetNet it
    is only checked). cuda_graphs: None (default) uses graphs where the model is on a CUDA device.
    prefill_tokens: prompts are prefilled in groups of equal length of at most this many tokens
    (bounds the prefill's activation memory); a longer prompt is cut into pieces of at most this
    many tokens, each continuing from the state the last one left (RetNet's recurrent state; the
    Transformer's cache, which the piece's queries attend to), so the prefill's activations do not
    grow with the prompt. compile: the decoding step goes through
    torch.compile first (fusing its elementwise work, with coordinate-descent tuning: see
    compile_settings; a CUDA graph then captures the compiled step);
    a string is torch.compile's mode, e.g. "max-autotune-no-cudagraphs" (inductor then also times
    its own GEMM kernels for the step's skinny matmuls; the engine captures its own graphs).
    state_window (RetNet): each layer's state is written back once every state_window tokens, the
    tokens in between kept as keys and values (model/retention_state.py): a step reads the state
    and writes it only at the window's end. 1 writes it every token; None (default): STATE_WINDOW
    where the one-kernel decoding step runs (a GPU), else 1.
    """

    def __init__(self, model, max_batch: int = 16, max_len: int = 4096, cuda_graphs: Optional[bool] = None,
                 prefill_tokens: int = 8192, chunk_size: Optional[int] = None, compile: bool | str = False,
                 state_window: Optional[int] = None):
        if max_batch < 1 or max_len < 2:
            raise ValueError(f"max_batch={max_batch} must be >= 1 and max_len={max_len} >= 2")
        if state_window is not None and state_window < 1:
            raise ValueError(f"state_window={state_window} must be >= 1 (1: the state is written every token)")
        self.model = model.eval()
        model.fuse_projections()  # one matmul for q, k, v (and g): small decoding matmuls waste bandwidth
        self.arch = model.config.arch
        self.vocab_size = model.config.vocab_size
        self.max_batch, self.max_len = max_batch, max_len
        self.prefill_tokens, self.chunk_size = prefill_tokens, chunk_size
        p = next(model.parameters())
        self.device = p.device
        use_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        if use_graphs and self.device.type != "cuda":
            raise ValueError(f"cuda_graphs=True needs the model on a CUDA device, it is on {self.device}")
        self.state_window = self._state_window(state_window)
        window = {"state_window": self.state_window} if self.arch == "retnet" else {}
        self.state = model.allocate_state(max_batch, max_len, **window)
        self.tokens = torch.zeros(max_batch, dtype=torch.long, device=self.device)  # the last token of each
        self.done = torch.zeros(max_batch, dtype=torch.bool, device=self.device)
        self.step_index = torch.zeros((), dtype=torch.long, device=self.device)
        self.eos = torch.full((), -1, dtype=torch.long, device=self.device)
        self.settings = SamplingSettings(max_batch, self.device)
        # the model's part of the step, compiled where asked (sampling stays eager: inductor gains
        # little on a sort over the vocabulary and has failed to compile it);
        # greedy decoding compiles the whole step (model, argmax, bookkeeping: a handful of tiny
        # kernels fewer per token)
        self.logits_fn, self.greedy_step_fn = self._logits, self._greedy_step
        if compile:
            self._logits(1)  # once eagerly: fills the model's per-device caches, which compiled code only reads
            self.logits_fn = torch.compile(self._logits, dynamic=False, **compile_settings(compile))
            self.greedy_step_fn = torch.compile(self._greedy_step, dynamic=False, **compile_settings(compile))
        self.graphs = StepGraphs(self._step) if use_graphs else None

    def _state_window(self, asked: Optional[int]) -> int:
        """RetNet's state_window: as asked, or (None) STATE_WINDOW where the one-kernel decoding
        step runs (a GPU with our or fla's kernels, the paper's gate and norm), else 1 (the torch
        step, which rebuilds the whole state from the window, gains nothing from it)."""
        if self.arch != "retnet":
            return 1
        if asked is not None:
            return asked
        return STATE_WINDOW if self.model.decodes_in_one_kernel(self.device) else 1

    def close(self) -> None:
        """Free the state, the buffers and the graphs now (the graphs refer back to this object, so
        dropping the last reference leaves them to the cycle collector)."""
        self.graphs = None
        self.state = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ---- one decoding step: device tensors only, fixed shapes ---------------------------------

    def _logits(self, n: int) -> Tensor:
        """Feed the first n sequences' last tokens through the model (state updated in place) ->
        next-token logits [n, V]."""
        state = State(layers=[layer[:n] for layer in self.state.layers], offset=self.state.offset[:n], in_place=True)
        logits, _ = self.model.step(self.tokens[:n, None], state)
        return logits[:, -1]

    def _step(self, n: int, greedy: bool) -> None:
        """One token for the first n sequences: logits, the next ids, advance; all in place."""
        if greedy:
            self.greedy_step_fn(n)
            return
        logits = self.logits_fn(n)
        self._advance(self.settings.select(slice(0, n)).sample(logits, self.step_index), n)

    def _greedy_step(self, n: int) -> None:
        self._advance(self._logits(n).argmax(-1), n)

    def _advance(self, nxt: Tensor, n: int) -> None:
        self._take(nxt, n)
        self.state.offset[:n] += 1

    def _take(self, nxt: Tensor, n: int) -> None:
        """Record the sampled ids [n]: a finished sequence repeats its end-of-sequence id."""
        done = self.done[:n]
        nxt = torch.where(done, self.eos, nxt)
        done |= nxt == self.eos
        self.tokens[:n] = nxt
        self.step_index += 1

    def bucket(self, n: int) -> int:
        """The batch size n prompts run at: the next power of two, at most max_batch."""
        b = 1
        while b < n:
            b *= 2
        return min(b, self.max_batch)

    # ---- generate -------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, eos_id: Optional[int] = None, seed: int = 0,
                 streams: Optional[Sequence[int]] = None,
                 on_token: Optional[Callable[[Tensor], None]] = None) -> list[list[int]]:
        """New token ids for each prompt (a list of ids): max_new_tokens of them, or fewer, ending
        with eos_id, where the sequence produced it. Sequence i draws its random numbers from
        (seed, streams[i]) (default: (seed, i)), so a prompt given the same stream samples the same
        in any batch. on_token, if given, is called with each step's ids [n] (a host
        synchronisation per token: for streaming)."""
        n = self._check(prompts, max_new_tokens, eos_id)
        if max_new_tokens == 0:
            return [[] for _ in prompts]
        b = self.bucket(n)
        greedy = temperature == 0
        if self.graphs is not None:
            self.graphs.ensure(b, greedy)  # first: its warm-up steps scribble on the buffers reset below
        if streams is not None and len(streams) != n:
            raise ValueError(f"{len(streams)} streams given for {n} prompts")
        # row r decodes prompt order[r]: sorted by length, so each prefill group is a slice of rows
        # (its state written in place) and no state of a whole group is ever held twice
        order = sorted(range(n), key=lambda i: len(prompts[i]))
        streams = list(range(n)) if streams is None else list(streams)
        self.settings.set(temperature, top_k, top_p, seed, [streams[i] for i in order])
        self.eos.fill_(-1 if eos_id is None else eos_id)
        self.step_index.zero_()
        self.done.zero_()
        self._reset_rows(0, b)
        self._prefill([prompts[i] for i in order])
        self.done[:n] = self.tokens[:n] == self.eos
        self.step_index.fill_(1)
        steps = [self.tokens[:n].clone()]
        self._emit(on_token, steps[-1])
        for i in range(1, max_new_tokens):
            if i % STOP_CHECK_EVERY == 0 and eos_id is not None and bool(self.done[:n].all()):
                break
            if self.graphs is not None:
                self.graphs.replay(b, greedy)
            else:
                self._step(b, greedy)
            steps.append(self.tokens[:n].clone())
            self._emit(on_token, steps[-1])
        rows = torch.stack(steps, dim=1).tolist()
        out: list[list[int]] = [[] for _ in range(n)]
        for r, i in enumerate(order):
            out[i] = rows[r]
        return _trim(out, eos_id)

    @staticmethod
    def _emit(on_token, ids: Tensor) -> None:
        if on_token is not None:
            on_token(ids)

    def _check(self, prompts, max_new_tokens: int, eos_id: Optional[int]) -> int:
        n = len(prompts)
        if n == 0:
            raise ValueError("no prompts given")
        if n > self.max_batch:
            raise ValueError(f"{n} prompts are more than max_batch={self.max_batch}")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
        if eos_id is not None and not 0 <= eos_id < self.vocab_size:
            raise ValueError(f"eos_id={eos_id} is outside the vocabulary [0, {self.vocab_size})")
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty: a prompt needs at least one token (a BOS id)")
            bad = [t for t in p if not (isinstance(t, int) and 0 <= t < self.vocab_size)]
            if bad:
                raise ValueError(f"prompt {i}: token id {bad[0]!r} is outside the vocabulary [0, {self.vocab_size})")
            if len(p) + max_new_tokens > self.max_len:
                raise ValueError(f"prompt {i}: {len(p)} tokens + max_new_tokens={max_new_tokens} = "
                                 f"{len(p) + max_new_tokens} exceeds max_len={self.max_len}")
        return n

    def _reset_rows(self, n: int, b: int) -> None:
        """Rows n .. b-1 start clean: a zero state (a prompt's prefill starts from it; rows past the
        prompts decode alongside as padding) and a valid token."""
        self.tokens[n:b] = 0
        self.state.offset[n:b] = 0
        for layer in self.state.layers:
            rows = layer[n:b]
            for t in ((rows.k, rows.v) if isinstance(rows, StaticKVCache) else (rows,)):
                t.zero_()  # a Tensor, a WindowedState (its window restarts too), or a cache's k and v

    def _prefill(self, prompts) -> None:
        """Prompts sorted by length, one row each: each run of equal lengths goes through the model
        together (chunkwise for RetNet), at most prefill_tokens at a time (a longer prompt in pieces),
        with its rows' state written in place; its first new token is sampled at step 0."""
        start = 0
        while start < len(prompts):
            length = len(prompts[start])
            end = start + 1
            while end < len(prompts) and len(prompts[end]) == length and (end - start + 1) * length <= self.prefill_tokens:
                end += 1
            self._prefill_rows(prompts, start, end, length)
            start = end

    def _prefill_rows(self, prompts, r0: int, r1: int, length: int) -> None:
        ids = torch.tensor([list(prompts[r]) for r in range(r0, r1)], dtype=torch.long, device=self.device)
        mode = "chunkwise" if self.arch == "retnet" else "parallel"
        piece = self._prefill_piece(r1 - r0)
        for start in range(0, length, piece):  # each piece continues from the state the last one left
            rows = State(layers=[layer[r0:r1] for layer in self.state.layers], offset=start, in_place=True)
            hidden, _ = self.model(ids[:, start:start + piece], mode=mode, chunk_size=self.chunk_size, state=rows,
                                   return_state=True, return_hidden=True)
        logits = self.model.lm_head(hidden[:, -1])  # only the last position's logits: [n, V]
        self.state.offset[r0:r1] = length
        first = torch.zeros((), dtype=torch.long, device=self.device)  # step 0: the first new token
        self.tokens[r0:r1] = self.settings.select(slice(r0, r1)).sample(logits, first)

    def _prefill_piece(self, rows: int) -> int:
        """Tokens per row in one prefill forward: prefill_tokens over the rows, in whole chunks where
        that is at least one chunk (RetNet's chunkwise form costs the same per token)."""
        piece = max(1, self.prefill_tokens // rows)
        chunk = self.chunk_size or self.model.config.chunk_size
        return piece // chunk * chunk if piece >= chunk else piece


def compile_settings(compile: bool | str) -> dict:
    """torch.compile's arguments for the step. True: inductor's coordinate-descent tuning, under
    which a one-row matmul (batch 1) becomes a reduction fused with its neighbours (norm,
    activation) and tuned, instead of a cuBLAS call plus its own elementwise kernels. A string is
    torch.compile's mode (which cannot be combined with inductor options)."""
    if compile is True:
        return {"options": {"coordinate_descent_tuning": True}}
    return {"mode": compile}


def _trim(rows: list[list[int]], eos_id: Optional[int]) -> list[list[int]]:
    """Cut each sequence after its first end-of-sequence id."""
    if eos_id is None:
        return rows
    return [r[: r.index(eos_id) + 1] if eos_id in r else r for r in rows]

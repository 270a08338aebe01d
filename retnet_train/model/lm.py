"""The language-model shell both networks share: embedding, a stack of blocks, final norm, LM head.

A block is any module called as `block(x, ctx, layer_state) -> (x, new_layer_state)`; RetNet and
the Transformer differ only in their blocks. `State` carries what decoding needs between calls.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from . import init
from .checkpointing import keep_matmul_outputs
from .config import MODES, ModelConfig
from .kernels import resolve_kernels
from .layers import document_positions, make_norm, rotary_sin_cos, rotary_sin_cos_at

log = logging.getLogger(__name__)

CHECKPOINTING = ("none", "full", "selective")


@dataclass
class State:
    """Per-layer recurrent state (RetNet: [B, H, d_k, d_v], or a retention_state.WindowedState that
    the inference engine writes back once per window; Transformer: its KV cache) and the
    number of tokens consumed so far, which fixes the rotary positions of the next tokens: an int,
    or a long tensor [B] where each sequence of a batch is at its own position (ragged decoding).

    `in_place`: the layers are preallocated buffers (`model.allocate_state`) that a call updates in
    place, as the inference engine's CUDA graphs need: a recurrent step one token at a time, or a
    prefill (chunkwise / parallel) of sequences starting at the same position; the returned state
    holds the same buffers."""

    layers: list[Any] = field(default_factory=list)
    offset: int | Tensor = 0
    in_place: bool = False


@dataclass
class ForwardContext:
    """What every block needs to know about this call."""

    mode: str
    chunk_size: int
    offset: int | Tensor  # absolute position of the first token: an int, or [B] per sequence
    need_state: bool
    kernels: str = "torch"  # the model's resolved kernel choice: torch | fla | triton
    retention_keep: str = "none"  # model.retention_keep: what the triton kernels keep for the backward
    state_in_place: bool = False  # layer states are buffers the step updates in place (State.in_place)
    doc_starts: Tensor | None = None  # [B, T] bool, true at each document's first token
    positions: Tensor | None = None  # [B, T] each token's position in its document (with doc_starts)
    cu_seqlens: Tensor | None = None  # the documents as packed sequences, for the kernels (with doc_starts)
    # context parallelism (parallel/context_parallel.py): this call holds slice `rank` of `size`
    # consecutive slices of each sequence; resets [size, B] bool: a document starts in slice j
    context_parallel: Any = None
    cp_resets: Tensor | None = None
    # sin, cos of every token's rotary angles (fp32 [T, 1, d_k], or [B, T, 1, d_k] per sequence or
    # document): made once per call, since every layer has the same head dim and base
    rotary: tuple[Tensor, Tensor] | None = None


class LanguageModel(nn.Module):
    def __init__(self, cfg: ModelConfig, blocks: list[nn.Module]):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.embed_dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(blocks)
        self.norm = make_norm(cfg, cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.activation_checkpointing = "none"
        self.checkpoint_layers: int | None = None  # how many blocks (the first) checkpoint; None: all
        self._compiled_block = None  # compile_blocks(): run_block through torch.compile
        self.memory_budget = None  # compile_blocks(memory_budget=...): what compiled blocks may keep
        self.compile_tuning = None  # compile_blocks(tuning=...): how their fused kernels were sized
        self.compile_pdl = False  # compile_blocks(pdl=...): their kernels launched as dependent launches
        self.residual_dtype: torch.dtype | None = None  # set_residual_dtype(); None: the embedding's dtype
        # resolved once, for the device the model is built on (torch.device(...) context)
        self.kernels = resolve_kernels(cfg.kernels)
        log.info("model.kernels=%s -> %s", cfg.kernels, self.kernels)
        if cfg.retention_keep != "none" and self.kernels != "triton":
            log.warning("model.retention_keep=%s does nothing with model.kernels -> %s: only our Triton "
                        "retention kernels keep forward results for the backward", cfg.retention_keep, self.kernels)
        self.reset_parameters()

    def init_rules(self) -> dict[str, init.Rule]:
        """The official initialisation of embedding and LM head: N(0, d^-1/2); blocks name their own."""
        std = self.config.d_model ** -0.5
        return {"embed.weight": init.normal(std), "lm_head.weight": init.normal(std)}

    def reset_parameters(self, seed: int | None = None) -> None:
        """Draw every weight from `seed` (default: torch.initial_seed(), the seed last given to
        torch.manual_seed): each value is a function of (seed, parameter name, index), so building
        again with the same seed gives the same weights, and a tensor-parallel or ZeRO-3 shard drawn
        on its own (parallel/sharded_init.py) gives the same values as this. No-op on the meta device."""
        init.init_parameters(self, torch.initial_seed() if seed is None else seed)

    def set_activation_checkpointing(self, mode: str | bool = "full", layers: int | None = None) -> None:
        """What each block keeps for backward: "none" everything; "full" only its input (the whole
        block is recomputed); "selective" the matmul and retention outputs, recomputing the cheap
        elementwise work (norms, rotary, gate, activations). True/False mean full/none.

        `layers`: only the first `layers` blocks checkpoint, the others keep everything (None: every
        block). Where the memory left beside full checkpointing holds a few blocks' activations, those
        blocks are not recomputed: at 128k tokens each one spared is 1/n_layers of the recompute."""
        mode = {True: "full", False: "none"}.get(mode, mode) if isinstance(mode, bool) else mode
        if mode not in CHECKPOINTING:
            raise ValueError(f"activation checkpointing {mode!r} is not one of {list(CHECKPOINTING)}")
        n = len(self.layers)
        if layers is not None and not (isinstance(layers, int) and 0 <= layers <= n):
            raise ValueError(f"checkpoint layers {layers!r}: must be a count of blocks from 0 to {n}, or None for all")
        self.activation_checkpointing = mode
        self.checkpoint_layers = layers
        self._plan_recompute()

    def _plan_recompute(self) -> None:
        """Tell each block (that asks: RetNet's) its checkpointing mode and the compile budget."""
        for i, block in enumerate(self.layers):
            if hasattr(block, "plan_recompute"):
                block.plan_recompute(self.block_checkpointing(i), self.memory_budget)

    def block_checkpointing(self, i: int) -> str:
        """The checkpointing mode of block i in training (set_activation_checkpointing)."""
        if self.checkpoint_layers is not None and i >= self.checkpoint_layers:
            return "none"
        return self.activation_checkpointing

    def compile_blocks(self, memory_budget: float | None = None, tuning: str = "default", pdl: bool = False) -> None:
        """Regional compilation: torch.compile one block's call (with its activation checkpointing,
        so selective checkpointing's policy is traced too) instead of the whole model. The blocks
        share one code path and their weights are graph inputs, so one graph serves every layer:
        compile time is one block's (seconds), not n_layers' (minutes for a 24-layer 1.3B), and the
        embedding, final norm and the loss stay eager.

        `memory_budget` (0 to 1, None: the compiler's default): the share of the block's activations
        its compiled graph may keep for backward; the compiler's partitioner recomputes the rest.
        `tuning` (a key of COMPILE_TUNINGS): how inductor sizes the fused kernels' tiles.
        `pdl`: the compiled kernels use programmatic dependent launch (PDL_OPTIONS)."""
        if memory_budget is not None and not 0.0 <= memory_budget <= 1.0:
            raise ValueError(f"memory_budget={memory_budget!r}: a share of the activations in [0, 1]")
        if tuning not in COMPILE_TUNINGS:
            raise ValueError(f"tuning={tuning!r} is not one of {list(COMPILE_TUNINGS)}")
        self.memory_budget, self.compile_tuning, self.compile_pdl = memory_budget, tuning, bool(pdl)
        self._plan_recompute()
        options = {**COMPILE_TUNINGS[tuning], **(PDL_OPTIONS if pdl else {})}
        backend = "inductor" if memory_budget is None and not options else _Inductor(memory_budget, options)
        self._compiled_block = torch.compile(run_block, backend=backend)

    def set_residual_dtype(self, dtype: torch.dtype | None) -> None:
        """The dtype of the stream the blocks add into, [B, T, d] between blocks (None: the embedding's).

        fp32 weights under bf16 autocast make an fp32 stream: every residual add, norm input and their
        gradients move 4 bytes per element, though each block's output is bf16. bf16 halves that (as bf16
        weights do); the norms still compute in fp32 under autocast."""
        self.residual_dtype = dtype

    def compile_summary(self) -> str:
        """What compile_blocks chose beyond compiling, for the start-up log: "" or ", compiled with
        activation memory budget B[, kernel tiles tuned by T][, dependent launches]" (each part only
        where it was set)."""
        budget = ("" if self.memory_budget is None
                  else f", compiled with activation memory budget {self.memory_budget:g}")
        tuned = "" if self.compile_tuning in (None, "default") else f", kernel tiles tuned by {self.compile_tuning}"
        return budget + tuned + (", dependent launches" if self.compile_pdl else "")

    def forward(self, ids: Tensor, mode: str = "parallel", chunk_size: int | None = None,
                state: State | None = None, return_state: bool = False, return_hidden: bool = False,
                doc_starts: Tensor | None = None, context_parallel=None):
        """ids [B, T] -> logits [B, T, vocab] (or final hidden states [B, T, d] with return_hidden).

        With `state`, the tokens continue the sequence that state summarises; with `return_state`,
        returns (logits, state) for a later call or for `step`. doc_starts [B, T] bool marks the first
        token of each document packed in the window: nothing before it is seen from it on (retention
        restarts its state, attention is block-diagonal) and, with model.rope_reset_at_documents,
        its rotary position is 0.

        `context_parallel` (a parallel.context_parallel.ContextParallel): ids are this rank's slice
        of longer sequences, the slices of the other ranks of its group come before and after it
        (training forms only: no state in or out).
        """
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is not one of {list(MODES)}")
        if context_parallel is not None and (state is not None or return_state or mode == "recurrent"):
            raise ValueError("context parallelism splits sequences for training (parallel or chunkwise form); "
                             "it takes no state in or out")
        ctx = ForwardContext(
            mode=mode,
            chunk_size=chunk_size or self.config.chunk_size,
            offset=state.offset if state is not None else 0,
            need_state=return_state,
            kernels=self.kernels,
            retention_keep=str(self.config.retention_keep),
            state_in_place=state is not None and state.in_place,
        )
        if context_parallel is not None:
            ctx.context_parallel = context_parallel
            ctx.offset = context_parallel.rank * ids.shape[1]  # rotary positions count over the whole sequence
        if doc_starts is not None:
            self._documents(ctx, ids, doc_starts)
        ctx.rotary = self._rotary_tables(ctx, ids.shape[1], ids.device)
        if ctx.state_in_place and mode == "recurrent" and ids.shape[1] != 1:
            raise ValueError(f"a state updated in place (State.in_place) takes one recurrent token per call, "
                             f"got {ids.shape[1]} tokens")
        x = self.embed(ids)
        if self.config.embed_scale:
            x = x * math.sqrt(self.config.d_model)
        x = self.embed_dropout(x)
        if self.residual_dtype is not None:
            x = x.to(self.residual_dtype)  # every block adds its output to this stream in this dtype
        training = self.training and torch.is_grad_enabled()
        run = self._compiled_block or run_block
        new_layers = []
        for i, block in enumerate(self.layers):
            ckpt = self.block_checkpointing(i) if training else "none"
            x, new = run(block, x, ctx, state.layers[i] if state is not None else None, ckpt)
            new_layers.append(new)
        x = self.norm(x)
        out = x if return_hidden else self.lm_head(x)
        if return_state:
            # with documents, the next token's position is one past the last token's in its document
            offset = ctx.positions[:, -1] + 1 if ctx.positions is not None else ctx.offset + ids.shape[1]
            return out, State(layers=new_layers, offset=offset, in_place=ctx.state_in_place)
        return out

    def _rotary_tables(self, ctx: ForwardContext, length: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """Once per call rather than once per layer: a decoding step otherwise spends three small
        kernels per layer rebuilding the same table (bench/decode_profile.py)."""
        cfg = self.config
        if ctx.positions is not None and cfg.rope_reset_at_documents:
            return rotary_sin_cos_at(ctx.positions, cfg.key_head_dim, cfg.rope_base)
        return rotary_sin_cos(cfg.key_head_dim, cfg.rope_base, ctx.offset, length, device)

    def _documents(self, ctx: ForwardContext, ids: Tensor, doc_starts: Tensor) -> None:
        """Fill ctx's document fields; a window without any document start is a plain window."""
        from .retention import packed_cu_seqlens

        if doc_starts.shape != ids.shape or doc_starts.dtype != torch.bool:
            raise ValueError(f"doc_starts must be a bool tensor shaped like ids {tuple(ids.shape)}, "
                             f"got {doc_starts.dtype} {tuple(doc_starts.shape)}")
        if ctx.state_in_place:
            raise ValueError("doc_starts with a state updated in place (the inference engine) is not supported")
        cp = ctx.context_parallel
        # with context parallelism the whole sequences' starts: [size, B, T] -> [B, size * T]
        whole = doc_starts if cp is None else cp.all_gather(doc_starts).permute(1, 0, 2).flatten(1)
        if not bool(whole.any()):  # one host check per forward (the same on every rank of a group)
            return
        ctx.doc_starts = doc_starts
        if cp is None:
            ctx.positions = document_positions(doc_starts, ctx.offset)
        else:  # a document begun on an earlier rank goes on counting its positions here
            ctx.positions = cp.slice(document_positions(whole))
            ctx.cp_resets = whole.view(whole.shape[0], cp.size, -1).any(dim=-1).T
        if self.kernels != "torch" and ctx.mode == "chunkwise":
            ctx.cu_seqlens = packed_cu_seqlens(doc_starts)

    def step(self, ids: Tensor, state: State | None):
        """Recurrent decoding: ids [B, 1] (or [B, n], taken token by token) -> (logits [B, n, vocab], state)."""
        return self.forward(ids, mode="recurrent", state=state, return_state=True)

    def fuse_projections(self) -> None:
        """For inference: each layer's projections of one input become one matmul (RetNet q, k, v,
        g; the Transformer's q, k, v), their weights views of one tensor. Call after any .to()."""
        for module in self.modules():
            if module is not self and hasattr(module, "fuse_projections"):
                module.fuse_projections()

    def allocate_state(self, batch: int, max_len: int, dtype: torch.dtype | None = None,
                       device: torch.device | None = None) -> State:
        """Zeroed decoding state for `batch` sequences, updated in place by `step` (State.in_place).
        `max_len` bounds the tokens a KV cache holds (RetNet's state does not grow); `dtype` is the
        cache's (default: the model's); RetNet's state is always fp32."""
        p = next(self.parameters())
        dtype, device = dtype or p.dtype, device or p.device
        return State(layers=[block.allocate_state(batch, max_len, dtype, device) for block in self.layers],
                     offset=torch.zeros(batch, dtype=torch.long, device=device), in_place=True)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        seen, total = set(), 0
        for name, p in self.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            if exclude_embeddings and (name.startswith("embed.") or name.startswith("lm_head.")):
                continue
            total += p.numel()
        return total


# compile_blocks(tuning=...) -> inductor's config for the blocks' graphs. coordinate_descent: each fused
# kernel's first call times neighbouring tile sizes (XBLOCK, RBLOCK, warps) and keeps the fastest.
# The compiled elementwise code of a fp8 block ran at 1.2-3.1 TB/s under the default heuristics; the
# tuning gave the trainer 1.3% (H100, bench/RESULTS.md, 2026-12-07), within the spread between calls
COMPILE_TUNINGS = {"default": {}, "coordinate_descent": {"coordinate_descent_tuning": True}}

# compile_blocks(pdl=True) -> inductor's config: programmatic dependent launch (Hopper and later; inductor
# launches plainly where the device lacks it). Each compiled kernel waits for its predecessor's writes
# inside the kernel instead of at its launch, so its start overlaps the predecessor's drain: a compiled
# fp8 step of RetNet-1.3B launches about 1,950 short fused elementwise kernels. With coordinate descent
# the trainer reached 1.54x fla's RetNet-1.3B at 8 x 2048 and 2 x 8192, where it had 1.46-1.51x without
# either (H100, the options set by a hook before the keys existed; through the keys on an H200, 1.53-1.56x,
# on three other H100s 1.45-1.52x; bench/RESULTS.md, 2026-12-07)
PDL_OPTIONS = {"triton.enable_pdl": True}


class _Inductor:
    """torch.compile's backend: inductor with config patches (`options`) and its partitioner (which
    splits forward from backward when a graph is compiled) under torch's activation memory budget
    (`budget`, None: its default). A backend of its own also keeps the graphs apart: dynamo reuses
    a compiled graph only under the backend that compiled it, so another model of this process
    compiled with another budget or other options, or none, gets its own."""

    compiler_name = "inductor"  # what dynamo's debugging tools see

    def __init__(self, budget: float | None, options: dict):
        self.budget, self.options = budget, dict(options)

    def __call__(self, graph, example_inputs):
        from torch._inductor.compile_fx import compile_fx  # patches the backward's compile too, which runs later

        budget = {} if self.budget is None else {"activation_memory_budget": self.budget}
        with torch._functorch.config.patch(**budget):
            return compile_fx(graph, example_inputs, config_patches=self.options or None)


def run_block(block: nn.Module, x: Tensor, ctx: ForwardContext, layer_state, checkpointing: str):
    """One block's call, under the activation checkpointing mode ("none" | "full" | "selective")."""
    if checkpointing == "none":
        return block(x, ctx, layer_state)
    if checkpointing == "full":  # no context_fn argument: torch.compile cannot trace a chosen noop_context_fn
        return checkpoint(block, x, ctx, layer_state, use_reentrant=False)
    return checkpoint(block, x, ctx, layer_state, use_reentrant=False, context_fn=keep_matmul_outputs)


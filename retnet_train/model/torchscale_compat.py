"""Reproduce microsoft/torchscale's RetNetDecoder: its config as a ModelConfig, its weights mapped in.

The official flavour is: RMSNorm everywhere, GLU FFN, per-head RMSNorm without affine weight, no
biases, its decay-mask and score normalisations, explicit value and FFN widths.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import torch
from torch import nn

from .config import ModelConfig, validate


def config_from_torchscale(args: Any, vocab_size: int) -> ModelConfig:
    """ModelConfig equal to a torchscale RetNetConfig (or any object with its attribute names)."""
    if getattr(args, "layernorm_embedding", False) or getattr(args, "deepnorm", False):
        raise ValueError("torchscale options layernorm_embedding and deepnorm are not supported")
    return validate(ModelConfig(
        arch="retnet",
        vocab_size=vocab_size,
        d_model=args.decoder_embed_dim,
        n_layers=args.decoder_layers,
        n_heads=args.decoder_retention_heads,
        value_dim=args.decoder_value_embed_dim,
        ffn_dim=args.decoder_ffn_embed_dim,
        ffn_type="glu",
        glu_activation=str(args.activation_fn),
        norm="rmsnorm",
        norm_eps=args.layernorm_eps,
        head_norm="rmsnorm",
        head_norm_eps=args.layernorm_eps,
        head_norm_affine=False,
        score_norm="torchscale",
        bias=False,
        tie_embeddings=bool(args.share_decoder_input_output_embed),
        embed_scale=not args.no_scale_embedding,
        dropout=float(args.dropout),
        chunk_size=int(args.recurrent_chunk_size),
    ))


# torchscale name -> ours; {i} is the layer index
_RENAMES = [
    (r"^embed_tokens\.weight$", "embed.weight"),
    (r"^output_projection\.weight$", "lm_head.weight"),
    (r"^layer_norm\.weight$", "norm.weight"),
    (r"^layers\.(\d+)\.retention_layer_norm\.weight$", r"layers.\1.retention_norm.weight"),
    (r"^layers\.(\d+)\.final_layer_norm\.weight$", r"layers.\1.ffn_norm.weight"),
    (r"^layers\.(\d+)\.retention\.(q|k|v|g|out)_proj\.weight$", r"layers.\1.retention.\2_proj.weight"),
    (r"^layers\.(\d+)\.ffn\.(fc1|fc2|gate)\.weight$", r"layers.\1.ffn.\2.weight"),
]
# buffers torchscale stores that we recompute (rotary angles, decays)
_DERIVED = re.compile(r"^retnet_rel_pos\.(angle|decay)$")


def load_torchscale_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True):
    """Load a torchscale RetNetDecoder state dict (with or without a fairseq `decoder.` prefix)."""
    mapped, unknown = {}, []
    for name, tensor in state_dict.items():
        name = name[len("decoder."):] if name.startswith("decoder.") else name
        if _DERIVED.match(name):
            continue
        for pattern, target in _RENAMES:
            if re.match(pattern, name):
                mapped[re.sub(pattern, target, name)] = tensor
                break
        else:
            unknown.append(name)
    if unknown and strict:
        raise KeyError(f"torchscale state dict has keys with no counterpart here: {unknown}")
    if model.config.tie_embeddings:
        mapped.pop("lm_head.weight", None)
    return model.load_state_dict(mapped, strict=strict)

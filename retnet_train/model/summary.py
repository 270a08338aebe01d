"""Print a model's size, FLOPs per token and decoding memory, without allocating its weights.

    python -m retnet_train.model.summary model=retnet_6.7b [context=8192] [seq_len=2048] [mode=chunkwise] [kernels=auto]

The kernels line says what model.kernels resolves to on this machine (its GPU if it has one).
"""

from __future__ import annotations

import sys

import torch

from . import ModelConfigError, build_model, load_preset, preset_names
from .flops import forward_flops_per_token, kv_cache_bytes, recurrent_state_bytes, training_flops_per_token


def _gib(n: float) -> str:
    return f"{n / 2**30:.3f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def summarise(name: str, context: int = 8192, seq_len: int = 2048, mode: str = "chunkwise",
              kernels: str | None = None) -> str:
    cfg = load_preset(name, **({"kernels": kernels} if kernels else {}))
    with torch.device("meta"):
        model = build_model(cfg)
    machine = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    lines = [
        f"model             {name} ({cfg.arch}: d={cfg.d_model}, layers={cfg.n_layers}, heads={cfg.n_heads}, "
        f"d_k/head={cfg.key_head_dim}, d_v/head={cfg.value_head_dim}, ffn={cfg.ffn_width}, vocab={cfg.vocab_size})",
        f"parameters        {model.num_parameters() / 1e9:.3f} B "
        f"({model.num_parameters(exclude_embeddings=True) / 1e9:.3f} B without embedding and LM head)",
        f"FLOPs per token   forward {forward_flops_per_token(cfg, seq_len, mode) / 1e9:.2f} G, "
        f"training {training_flops_per_token(cfg, seq_len, mode) / 1e9:.2f} G (T={seq_len}, {mode})",
        f"kernels           {model.kernels} (model.kernels={cfg.kernels}, on this machine: {machine})",
    ]
    if cfg.arch == "retnet":
        state = recurrent_state_bytes(cfg)
        twin_name = name.replace("retnet_", "transformer_")
        twin = load_preset(twin_name) if twin_name in preset_names() else cfg
        kv = kv_cache_bytes(twin, context)
        lines += [
            f"decoding memory   recurrent state {_gib(state)} per sequence at any context (bf16)",
            f"                  {twin_name if twin is not cfg else 'same-size Transformer'} KV cache "
            f"{_gib(kv)} per sequence at context {context} ({kv / state:.1f}x the state)",
        ]
    else:
        lines.append(f"decoding memory   KV cache {_gib(kv_cache_bytes(cfg, context))} per sequence at context {context} (bf16)")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    args = dict(a.split("=", 1) for a in argv if "=" in a)
    keys = ("model", "context", "seq_len", "mode", "kernels")
    bad = [a for a in argv if "=" not in a] + [k for k in args if k not in keys]
    if bad:
        sys.exit("usage: python -m retnet_train.model.summary model=NAME [context=N] [seq_len=N] [mode=M] "
                 f"[kernels=K]; bad: {bad}")
    sizes = {}
    for key, default in (("context", 8192), ("seq_len", 2048)):
        value = args.get(key, str(default))
        if not value.isdigit() or int(value) < 1:
            sys.exit(f"error: {key}={value!r} must be a whole number >= 1")
        sizes[key] = int(value)
    try:
        print(summarise(args.get("model", "retnet_1.3b"), sizes["context"], sizes["seq_len"],
                        args.get("mode", "chunkwise"), args.get("kernels")))
    except ModelConfigError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main(sys.argv[1:])

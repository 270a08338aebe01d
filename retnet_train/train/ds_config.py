"""The DeepSpeed JSON, derived from the Hydra config (no hand-written JSON files)."""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf


def deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def zero_section(ds) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": ds.stage}
    if ds.stage >= 1:
        zero.update(reduce_bucket_size=ds.reduce_bucket_size, allgather_bucket_size=ds.allgather_bucket_size,
                    overlap_comm=ds.overlap_comm, contiguous_gradients=ds.contiguous_gradients)
    if ds.stage == 3:
        zero.update(stage3_prefetch_bucket_size=ds.stage3_prefetch_bucket_size,
                    stage3_param_persistence_threshold=ds.stage3_param_persistence_threshold,
                    stage3_gather_16bit_weights_on_model_save=False)
        zero.pop("allgather_bucket_size")
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return zero


def build_ds_config(ds, optim, micro_batch_size: int, layout: dict, precision: str,
                    own_clipping: bool) -> dict[str, Any]:
    """ds, optim: the config's deepspeed and optim sections; micro_batch_size: trainer.micro_batch_size.
    own_clipping: the trainer clips (ZeRO-0 with fp32 parameters, where DeepSpeed hands back the
    raw optimizer). precision: fp32 | bf16 (bf16 parameters, fp32 master weights in the optimizer) |
    bf16_autocast (fp32 parameters, bf16 compute)."""
    o = optim
    out: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": layout["grad_accum"],
        # DeepSpeed counts every rank of its data-parallel group, the cp ranks of a sequence too
        # (it averages their gradients: each holds the mean loss of an equal slice)
        "train_batch_size": micro_batch_size * layout["grad_accum"] * layout["dp_size"] * layout.get("cp_size", 1),
        "gradient_clipping": 0.0 if own_clipping else float(o.grad_clip),
        "zero_optimization": zero_section(ds),
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**62,  # the trainer logs
        "wall_clock_breakdown": False,
        "bf16": {"enabled": precision == "bf16"},
    }
    if precision == "bf16" and ds.stage >= 1:
        out["data_types"] = {"grad_accum_dtype": "fp32"}  # ZeRO-0 + bf16 accumulates in bf16 (DeepSpeed's only mix)
    if precision == "bf16_autocast":  # fp32 parameters, bf16 matmuls under torch.autocast
        out["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    if o.impl == "deepspeed":
        out["optimizer"] = {"type": "AdamW", "params": {
            "lr": o.lr, "betas": list(o.betas), "eps": o.eps, "weight_decay": o.weight_decay}}
    extra = OmegaConf.to_container(ds.extra, resolve=True) if ds.extra else {}
    return deep_merge(out, extra)

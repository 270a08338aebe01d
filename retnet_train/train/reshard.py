"""Elastic resume: the training state of a checkpoint written at another (data-parallel, tensor-parallel)
size, in the layout of this run.

DeepSpeed cuts the optimizer state (fp32 master weights, Adam's exp_avg / exp_avg_sq) differently for
each ZeRO stage and data-parallel size, and tensor parallelism slices each weight. So:

1. `read_full_state` reassembles every parameter whole: the data-parallel pieces of each
   tensor-parallel rank (ZeRO-1/2: the fragments each rank's partition lists, `param_slice_mappings`;
   ZeRO-3: each parameter split evenly over the ranks; ZeRO-0: the torch optimizer's own state),
   then the tensor-parallel slices through the split table (parallel/tensor_parallel.py, split_dim).
2. `write_universal` writes, per tensor-parallel rank of this run, that rank's slice of each
   parameter in DeepSpeed's universal checkpoint layout (`zero/<name>/fp32.pt`, ...), which DeepSpeed
   loads at any data-parallel size and ZeRO stage (engine.load_checkpoint with load_universal).
   The slices are cut here, from our own split table: DeepSpeed's universal loader slices tensor
   parallelism for ZeRO-1/2 only and from patterns a Megatron model supplies.
3. `load_plain` does the same for a ZeRO-0 run, whose optimizer is torch's own, in bf16 inside
   DeepSpeed's wrapper with the fp32 masters (DeepSpeed's universal load applies to neither): the
   module's weights, the masters and the optimizer's state_dict.

In bf16 the ZeRO-1-3 optimizer files are named `bf16_zero_pp_rank_*` (ZeRO-1: DeepSpeed's
BF16_Optimizer; ZeRO-2/3: the ZeRO optimizers, same layout as in fp32); the module holds bf16 weights,
so the fp32 values always come from the optimizer's masters.

The whole fp32 optimizer state passes through one process (12 bytes per parameter in host memory).
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from retnet_train.parallel.tensor_parallel import merge_state_dicts, shard_state_dict

KEYS = ("fp32", "exp_avg", "exp_avg_sq")


class ReshardError(RuntimeError):
    """A checkpoint whose files do not hold what its meta.json says; the message names the file."""


@dataclass
class FullState:
    params: dict[str, dict[str, torch.Tensor]]  # KEYS -> {parameter name: whole fp32 tensor}
    step: object                                # Adam's step count as the optimizer stored it (None: no step)
    param_groups: list[dict]                    # the optimizer's hyperparameters per group, without "params"


def _load(path: Path) -> dict:
    if not path.is_file():
        raise ReshardError(f"{path}: missing (the checkpoint's meta.json says its ranks wrote it)")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file: name it
        raise ReshardError(f"{path}: unreadable ({type(e).__name__}: {e})") from None


def _groups_without_params(groups: list[dict]) -> list[dict]:
    return [{k: v for k, v in g.items() if k != "params"} for g in groups]


def _numel(shape) -> int:
    return math.prod(shape)


def _fragments_rank(ckpt: Path, tp_rank: int, dp: int, prefix: str):
    """ZeRO-1/2 (and DeepSpeed's bf16 optimizer): each data-parallel rank's flat partition of each
    parameter group lists the fragment of every parameter it holds; a parameter's fragments, in
    rank order, are the whole parameter."""
    shapes = _load(ckpt / f"mp_rank_{tp_rank:02d}_model_states.pt")["param_shapes"]
    pieces: dict[str, dict[str, list]] = {k: {} for k in KEYS}
    step, groups = None, None
    for d in range(dp):
        path = ckpt / f"{prefix}zero_pp_rank_{d}_mp_rank_{tp_rank:02d}_optim_states.pt"
        osd = _load(path)["optimizer_state_dict"]
        base = osd["base_optimizer_state"]
        groups = groups or _groups_without_params(base["param_groups"])
        for g, mapping in enumerate(osd["param_slice_mappings"]):
            flat = {"fp32": osd["single_partition_of_fp32_groups"][g]}
            state = base["state"].get(g, {})
            flat.update({k: state[k] for k in ("exp_avg", "exp_avg_sq") if k in state})
            step = state.get("step", step)
            for name, frag in mapping.items():
                for key, tensor in flat.items():
                    pieces[key].setdefault(name, []).append(tensor.narrow(0, frag.start, frag.numel))
    out: dict[str, dict[str, torch.Tensor]] = {k: {} for k in KEYS}
    for group in shapes:
        for name, shape in group.items():
            for key in KEYS:
                if name not in pieces[key]:
                    raise ReshardError(f"{ckpt}: no {key} for {name} in the optimizer files of tensor-parallel "
                                       f"rank {tp_rank}")
                flat = torch.cat(pieces[key][name])
                if flat.numel() != _numel(shape):
                    raise ReshardError(f"{ckpt}: {name} ({key}) has {flat.numel()} elements in the optimizer "
                                       f"files of tensor-parallel rank {tp_rank}, its shape {tuple(shape)} needs "
                                       f"{_numel(shape)}")
                out[key][name] = flat.view(shape).clone()
    return out, step, groups


def _zero3_rank(ckpt: Path, tp_rank: int, dp: int, prefix: str):
    """ZeRO-3: every parameter is split evenly (the last piece padded) over the data-parallel
    ranks; each rank's flat groups hold its piece of each parameter, in the order of param_shapes."""
    shapes = _load(ckpt / f"zero_pp_rank_0_mp_rank_{tp_rank:02d}_model_states.pt")["param_shapes"]
    names = [(n, s) for group in shapes for n, s in group.items()]
    flats: dict[str, list[torch.Tensor]] = {k: [] for k in KEYS}
    step, groups = None, None
    for d in range(dp):
        path = ckpt / f"{prefix}zero_pp_rank_{d}_mp_rank_{tp_rank:02d}_optim_states.pt"
        osd = _load(path)["optimizer_state_dict"]
        inner = osd["optimizer_state_dict"]
        groups = groups or _groups_without_params(inner["param_groups"])
        state = [inner["state"][i] for i in sorted(inner["state"])]
        flats["fp32"].append(torch.cat(osd["fp32_flat_groups"]))
        for key in ("exp_avg", "exp_avg_sq"):
            flats[key].append(torch.cat([s[key] for s in state]))
        step = state[0]["step"] if state else None
        need = sum(math.ceil(_numel(s) / dp) for _, s in names)
        if flats["fp32"][-1].numel() < need:
            raise ReshardError(f"{path}: {flats['fp32'][-1].numel()} fp32 elements, the parameters of "
                               f"{ckpt.name} need {need} per rank")
    out: dict[str, dict[str, torch.Tensor]] = {k: {} for k in KEYS}
    offset = 0
    for name, shape in names:
        n = _numel(shape)
        part = math.ceil(n / dp)
        for key in KEYS:
            whole = torch.cat([f.narrow(0, offset, part) for f in flats[key]])
            out[key][name] = whole[:n].view(shape).clone()
        offset += part
    return out, step, groups


def _zero0_rank(ckpt: Path, tp_rank: int):
    """ZeRO-0: the model file holds the module and the optimizer's state_dict, whose parameters are
    numbered in the order of optimizer.param_groups: matrices, then the rest. In fp32 that is torch's
    optimizer; in bf16, DeepSpeed's wrapper of it, with the fp32 master weights in `fp32_groups`
    (aligned with the numbering) and torch's state under `optimizer_state_dict`."""
    path = ckpt / f"mp_rank_{tp_rank:02d}_model_states.pt"
    sd = _load(path)
    module, optim = sd["module"], sd.get("optimizer") or {}
    masters = optim.get("fp32_groups")
    if masters is not None:
        optim = optim.get("optimizer_state_dict") or {}
    if "state" not in optim or "param_groups" not in optim:
        raise ReshardError(f"{path}: no optimizer state (a ZeRO-0 checkpoint holds the optimizer's state here)")
    seen, names = set(), []
    for name, tensor in module.items():
        if tensor.data_ptr() not in seen:  # tied weights are one parameter
            seen.add(tensor.data_ptr())
            names.append(name)
    order = [n for n in names if module[n].ndim >= 2] + [n for n in names if module[n].ndim < 2]
    indices = [i for g in optim["param_groups"] for i in g["params"]]
    if len(indices) != len(order):
        raise ReshardError(f"{path}: the optimizer holds {len(indices)} parameters, the module {len(order)}")
    masters = [t for g in masters for t in g] if masters is not None else [module[n] for n in order]
    if len(masters) != len(order):
        raise ReshardError(f"{path}: fp32_groups holds {len(masters)} tensors, the module {len(order)} parameters")
    out: dict[str, dict[str, torch.Tensor]] = {k: {} for k in KEYS}
    step = None
    for i, name, master in zip(indices, order, masters):
        if master.shape != module[name].shape:
            raise ReshardError(f"{path}: the fp32 master of {name} has shape {tuple(master.shape)}, the module's "
                               f"{tuple(module[name].shape)}")
        out["fp32"][name] = master.detach().float().clone()
        state = optim["state"].get(i, {})
        for key in ("exp_avg", "exp_avg_sq"):
            out[key][name] = state[key].float().clone() if key in state else torch.zeros_like(out["fp32"][name])
        step = state.get("step", step)
    return out, step, _groups_without_params(optim["param_groups"])


def read_full_state(ckpt: Path, meta: dict) -> FullState:
    """Every parameter of checkpoint `ckpt` whole: fp32 weights and Adam's two moments."""
    tp, dp, stage = int(meta.get("tp_size", 1)), int(meta.get("dp_size", 1)), int(meta.get("zero_stage", 0))
    ranks = []
    for t in range(tp):
        # a bf16 run's ZeRO-1-3 optimizer files carry the prefix bf16_ (same layout inside); an older
        # meta.json without `precision`: whichever files are there
        precision = meta.get("precision")
        if precision is None:
            bf16_file = ckpt / f"bf16_zero_pp_rank_0_mp_rank_{t:02d}_optim_states.pt"
            precision = "bf16" if bf16_file.is_file() else "fp32"
        prefix = "bf16_" if precision == "bf16" else ""
        if stage in (1, 2):
            ranks.append(_fragments_rank(ckpt, t, dp, prefix))
        elif stage == 3:
            ranks.append(_zero3_rank(ckpt, t, dp, prefix))
        elif stage == 0:
            ranks.append(_zero0_rank(ckpt, t))
        else:
            raise ReshardError(f"{ckpt / 'meta.json'}: zero_stage={stage!r} is not one of 0-3")
    params = {key: merge_state_dicts([r[0][key] for r in ranks]) for key in KEYS}
    return FullState(params=params, step=ranks[0][1], param_groups=ranks[0][2])


def engine_counters(ckpt: Path) -> dict:
    """The step counters DeepSpeed keeps in its model file (the same in every one)."""
    files = sorted(ckpt.glob("*model_states.pt"))
    if not files:
        raise ReshardError(f"{ckpt}: no *model_states.pt file")
    sd = _load(files[0])
    return {k: sd[k] for k in ("global_steps", "skipped_steps", "global_samples") if k in sd}


def model_states_names() -> tuple[str, str]:
    """What DeepSpeed's load looks for, with load_universal: ZeRO-0-2, ZeRO-3 (pipeline and
    tensor-parallel ranks 0: each of our tensor-parallel ranks loads from its own folder)."""
    return "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"


def write_universal(full: FullState, out: Path, tp: int, engine_state: dict) -> None:
    """One folder per tensor-parallel rank of the new run, out/tp<r>, in DeepSpeed's universal layout
    with that rank's slices. `engine_state`: the counters DeepSpeed keeps in its model file
    (global_steps, skipped_steps, global_samples) and dp_world_size."""
    import deepspeed

    for r in range(tp):
        folder = out / f"tp{r}"
        zero = folder / "zero"
        zero.mkdir(parents=True)
        sliced = {key: shard_state_dict(full.params[key], r, tp) for key in KEYS}
        for name in sliced["fp32"]:
            (zero / name).mkdir()
            for key in KEYS:
                torch.save({"param": sliced[key][name].contiguous()}, zero / name / f"{key}.pt")
            if full.step is not None:
                torch.save(full.step, zero / name / "step.pt")
        # ZeRO-1/2 read param_groups at the top level, ZeRO-3 inside optimizer_state_dict (and its step there)
        state = {0: {"step": full.step}} if full.step is not None else {}
        torch.save({"param_groups": full.param_groups, "ds_version": deepspeed.__version__,
                    "optimizer_state_dict": {"state": state, "param_groups": full.param_groups}},
                   zero / "optimizer_state.pt")
        model = {"module": sliced["fp32"], "buffer_names": [], "param_shapes": None, "lr_scheduler": None,
                 # one file per folder: to DeepSpeed, a tensor-parallel world of one
                 "mp_world_size": 1, "ds_version": deepspeed.__version__, **engine_state}
        for name in model_states_names():
            torch.save(model, folder / name)


_ONE_RANK = SimpleNamespace(get_tensor_model_parallel_rank=lambda: 0, get_tensor_model_parallel_world_size=lambda: 1,
                            get_model_parallel_rank=lambda: 0, get_model_parallel_world_size=lambda: 1)


def load_universal(engine, folder: Path) -> None:
    """Load a folder of write_universal into a DeepSpeed engine (ZeRO-1-3, or DeepSpeed's bf16
    optimizer). DeepSpeed reads `checkpoint.load_universal` from its config at load time; it is
    switched on for this one load only, so that the run's own checkpoints load the usual way."""
    config, optimizer = engine._config, engine.optimizer
    before = config.load_universal_checkpoint, getattr(optimizer, "mpu", None)
    config.load_universal_checkpoint = True
    if hasattr(optimizer, "mpu"):
        # ZeRO-1/2 ask the mpu for the tensor-parallel rank and size to cut slices from whole tensors
        # (with Megatron's method names, which fairscale's registry lacks); the folder holds this
        # rank's slices already, so to that loader the tensor-parallel world is one rank
        optimizer.mpu = _ONE_RANK
    try:
        path, _ = engine.load_checkpoint(str(folder.parent), tag=folder.name, load_optimizer_states=True,
                                         load_lr_scheduler_states=False)
    finally:
        config.load_universal_checkpoint = before[0]
        if hasattr(optimizer, "mpu"):
            optimizer.mpu = before[1]
    if path is None:
        raise ReshardError(f"DeepSpeed could not load the converted checkpoint {folder}")
    # ZeRO-3's universal load gives every parameter group the hyperparameters of the first (measured:
    # the norms and biases got the matrices' weight decay); put back each group's own
    saved = torch.load(folder / "zero" / "optimizer_state.pt", weights_only=False)["param_groups"]
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    if len(inner.param_groups) != len(saved):
        raise ReshardError(f"{folder}: {len(saved)} optimizer parameter groups, this run has {len(inner.param_groups)}")
    for group, own in zip(inner.param_groups, saved):
        group.update(own)
    # ZeRO-3's universal load hands one `step` tensor to every group, which torch's Adam then counts
    # up in place once per group per step (measured: the second group's bias correction ran ahead)
    for state in inner.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def load_plain(engine, full: FullState, tp_rank: int, tp: int) -> None:
    """ZeRO-0: weights into the module, the moments into the optimizer's state_dict (numbered like
    optimizer.param_groups). In bf16, DeepSpeed's wrapper holds torch's optimizer over fp32 copies
    (`fp32_groups`) of the module's bf16 parameters (`fp16_groups`): the masters go there."""
    module, wrapper = engine.module, engine.optimizer
    weights = shard_state_dict(full.params["fp32"], tp_rank, tp)
    # not strict: a tied weight is one parameter in the checkpoint and two names in the module;
    # a bf16 module takes the fp32 weights rounded, as DeepSpeed's own copy after a step does
    unexpected = module.load_state_dict(weights, strict=False).unexpected_keys
    if unexpected:
        raise ReshardError(f"parameters of the checkpoint that this model does not have: {unexpected}")
    masters = getattr(wrapper, "fp32_groups", None)
    optimizer = wrapper.optimizer if masters is not None else wrapper
    model_groups = wrapper.fp16_groups if masters is not None else [g["params"] for g in optimizer.param_groups]
    names = {id(p): n for n, p in module.named_parameters()}
    exp_avg = shard_state_dict(full.params["exp_avg"], tp_rank, tp)
    exp_avg_sq = shard_state_dict(full.params["exp_avg_sq"], tp_rank, tp)
    state, groups, i = {}, [], 0
    for group, params, saved in zip(optimizer.param_groups, model_groups, full.param_groups):
        ids = []
        for p in params:
            name = names[id(p)]
            if full.step is not None:
                state[i] = {"step": torch.as_tensor(full.step, dtype=torch.float32).clone(),
                            "exp_avg": exp_avg[name].to(p.device), "exp_avg_sq": exp_avg_sq[name].to(p.device)}
            ids.append(i)
            i += 1
        groups.append({**group, **saved, "params": ids})
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    for group, params in zip(masters or [], model_groups):
        with torch.no_grad():
            for master, p in zip(group, params):
                master.copy_(weights[names[id(p)]])


def remove(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)

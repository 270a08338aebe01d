"""Initial weights as a pure function of (seed, parameter name, element index).

Every element of every parameter is drawn by a counter-based generator: a 32-bit integer hash of the
element's flat index in the full (unsharded) tensor, keyed by the seed and the parameter's name. Any
slice of a parameter (a tensor-parallel shard, a ZeRO-3 partition, a chunk of either) is therefore
drawn on its own, without drawing the rest, and holds exactly the values the whole tensor has:
`draw_` of the whole tensor and of its slices agree bit for bit (tests/test_sharded_init.py, CPU).

Exactness rests on using only exact or correctly rounded operations (integer arithmetic; float64
+, -, *, /, sqrt; frexp): torch computes log/cos of a CPU vector's tail elements with another routine
than its body, so the normal's log and cosine are polynomials here. The same operations are correctly
rounded in torch's CUDA kernels, so a GPU should draw the CPU's values too (not checked on a GPU). The distributions are the official RetNet
initialisation's (what each module's `init_rules` names): xavier-uniform bounds, N(0, std), constants.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

CHUNK = 1 << 22  # elements drawn per step: bounds the int64/float64 temporaries (32 MB each)


@dataclass(frozen=True)
class Rule:
    """How one parameter is drawn: "normal" (scale = std), "uniform" on [-scale, scale], "constant"."""

    kind: str
    scale: float


def normal(std: float) -> Rule:
    return Rule("normal", std)


def uniform(bound: float) -> Rule:
    return Rule("uniform", bound)


def constant(value: float) -> Rule:
    return Rule("constant", value)


def xavier_uniform(fan_out: int, fan_in: int, gain: float = 1.0) -> Rule:
    """nn.init.xavier_uniform_ of a [fan_out, fan_in] weight."""
    return uniform(gain * math.sqrt(6.0 / (fan_in + fan_out)))


def linear_default(fan_in: int) -> Rule:
    """nn.Linear's own init for its weight and bias: kaiming_uniform(a=sqrt(5)), i.e. U(+-1/sqrt(fan_in))."""
    return uniform(1.0 / math.sqrt(fan_in))


def collect_rules(model: nn.Module) -> dict[str, Rule]:
    """The rule of every parameter of an unsharded model, by its name in `named_parameters`.

    A module names the rules of its own and its children's parameters in `init_rules()` (relative
    names; the fans come from the unsharded shapes, so a tensor-parallel slice keeps the full
    tensor's bounds). torch's LayerNorm has none: weight 1, bias 0. A parameter no rule covers is
    an error, so a new parameter cannot silently start from uninitialised memory."""
    rules: dict[str, Rule] = {}
    for prefix, module in model.named_modules():
        own = module.init_rules() if hasattr(module, "init_rules") else {}
        if isinstance(module, nn.LayerNorm):
            own = {"weight": constant(1.0), "bias": constant(0.0)}
        for local, rule in own.items():
            rules[f"{prefix}.{local}" if prefix else local] = rule
    missing = [name for name, _ in model.named_parameters() if name not in rules]
    if missing:
        raise ValueError(f"retnet_train/model/init.py: no init rule for parameters {missing}: add them to the "
                         f"init_rules() of the module that holds them")
    return rules


def parameter_key(seed: int, name: str) -> tuple[int, int, int, int]:
    """Four 32-bit keys from (seed, name): two per uniform stream (the normal uses two streams)."""
    digest = hashlib.blake2b(f"{int(seed)}/{name}".encode(), digest_size=16).digest()
    return tuple(int.from_bytes(digest[i:i + 4], "little") for i in range(0, 16, 4))


def init_parameters(model: nn.Module, seed: int) -> None:
    """Draw every (non-meta) parameter of an unsharded model whole, by its rule."""
    rules = collect_rules(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not param.is_meta:
                draw_(param.data, rules[name], parameter_key(seed, name), tuple(param.shape))


def draw_(out: Tensor, rule: Rule, key: tuple[int, ...], full_shape: tuple[int, ...],
          offsets: tuple[int, ...] | None = None, view_shape: tuple[int, ...] | None = None,
          flat_start: int = 0) -> Tensor:
    """Fill `out` (contiguous, any shape) with elements flat_start .. flat_start + out.numel() of the
    view `full[offsets[0] : offsets[0] + view_shape[0], ...]` of the parameter whose full shape is
    `full_shape` (default view: the whole tensor). Returns `out`."""
    view_shape = tuple(view_shape if view_shape is not None else full_shape)
    offsets = tuple(offsets if offsets is not None else (0,) * len(full_shape))
    if flat_start + out.numel() > math.prod(view_shape):
        raise ValueError(f"elements {flat_start}..{flat_start + out.numel()} lie outside the view {view_shape}")
    flat_out = out.view(-1)
    if rule.kind == "constant":
        return out.fill_(rule.scale)
    for start in range(0, out.numel(), CHUNK):
        stop = min(start + CHUNK, out.numel())
        index = _full_index(flat_start + start, flat_start + stop, full_shape, offsets, view_shape, out.device)
        # through float32, as an fp32 model later cast to bf16 would round: one value whatever the dtype
        flat_out[start:stop] = _values(rule, key, index).float()
    return out


def _full_index(start: int, stop: int, full_shape, offsets, view_shape, device) -> Tensor:
    """Flat indices in the full tensor [stop - start] (int64) of the view's elements start .. stop."""
    i = torch.arange(start, stop, dtype=torch.int64, device=device)
    if tuple(view_shape) == tuple(full_shape):
        return i
    out = torch.zeros_like(i)
    stride = 1
    for dim in reversed(range(len(full_shape))):
        out += (i % view_shape[dim] + offsets[dim]) * stride
        i = i // view_shape[dim]
        stride *= full_shape[dim]
    return out


def _values(rule: Rule, key, index: Tensor) -> Tensor:
    """float64 values [n] of elements `index` [n]."""
    if rule.kind == "uniform":
        k = _bits(index, key[0], key[1]) >> 8  # 24 bits
        # (2k + 1) / 2^24 - 1: symmetric in (-1, 1), exact in float64
        return ((k * 2 + 1).double() * 2.0 ** -24 - 1.0) * rule.scale
    if rule.kind == "normal":
        u = ((_bits(index, key[0], key[1]) >> 8) + 1).double() * 2.0 ** -24  # (0, 1]
        t = (_bits(index, key[2], key[3]) >> 8).double() * 2.0 ** -24  # [0, 1)
        return torch.sqrt(_log(u) * -2.0) * _cos_2pi(t) * rule.scale  # Box-Muller
    raise ValueError(f"init rule kind {rule.kind!r} is not one of normal, uniform, constant")


# ---- a counter-based generator from integer ops that cannot overflow int64 ------------------------

_M32 = 0xFFFFFFFF


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x * c) mod 2^32 for x in [0, 2^32), every product below 2^63: c = 2^31 + c' contributes
    x * 2^31 = (x & 1) * 2^31 mod 2^32."""
    if c < 1 << 31:
        return x.mul_(c).bitwise_and_(_M32)
    high = (x & 1) << 31
    return x.mul_(c - (1 << 31)).add_(high).bitwise_and_(_M32)


def _mix32(x: Tensor) -> Tensor:
    """lowbias32 (C. Wellons' hash-prospector): a bijection of [0, 2^32) with strong avalanche.
    Updates x in place."""
    x.bitwise_xor_(x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x.bitwise_xor_(x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x.bitwise_xor_(x >> 16)


def _bits(index: Tensor, k0: int, k1: int) -> Tensor:
    """32 random bits per element (int64 in [0, 2^32)); a bijection of the low 32 index bits."""
    x = _mix32((index & _M32).bitwise_xor_(k0))
    return _mix32(x.bitwise_xor_(index >> 32).bitwise_xor_(k1))


def _log(u: Tensor) -> Tensor:
    """ln(u) for u in (0, 1], float64: u = m 2^e with m in [sqrt(1/2), sqrt(2)), ln m = 2 atanh(s)."""
    m, e = torch.frexp(u)  # m in [0.5, 1)
    small = m < math.sqrt(0.5)
    m = torch.where(small, m * 2.0, m)
    e = (e - small.to(e.dtype)).double()
    s = (m - 1.0) / (m + 1.0)  # |s| <= 0.172
    s2 = s * s
    series = torch.full_like(s, 1.0 / 17.0)
    for j in range(7, -1, -1):  # sum_j s^2j / (2j + 1), to s^16 (< 1e-13 relative)
        series.mul_(s2).add_(1.0 / (2 * j + 1))
    return e * math.log(2.0) + s * series * 2.0


def _cos_2pi(t: Tensor) -> Tensor:
    """cos(2 pi t) for t in [0, 1), float64: folded to an angle in [0, pi/2] and a Taylor series."""
    r = torch.where(t > 0.5, 1.0 - t, t)  # cos is even about 1/2: r in [0, 1/2]
    flip = r > 0.25
    y = torch.where(flip, 0.5 - r, r) * (2.0 * math.pi)  # [0, pi/2]
    y2 = y * y
    series = torch.full_like(y, (-1.0) ** 9 / math.factorial(18))
    for j in range(8, -1, -1):  # sum_j (-1)^j y^2j / (2j)!, to y^18 (< 1e-13)
        series.mul_(y2).add_((-1.0) ** j / math.factorial(2 * j))
    return torch.where(flip, -series, series)

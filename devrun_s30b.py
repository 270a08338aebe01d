# session 30 call B: which graph break makes a fully checkpointed compiled block run eagerly on the GPU
import sys, torch, torch._dynamo
from torch._dynamo.utils import counters
from retnet_train.model import build_model
import retnet_train.model.kernels.norm_gate as NG

def trial(mode, variant):
    torch._dynamo.reset(); counters.clear()
    torch.manual_seed(0)
    with torch.device("cuda"):
        m = build_model("retnet_tiny", kernels="triton")
    m.set_activation_checkpointing(mode)
    m.compile_blocks(); m.train()
    ids = torch.randint(0, 100, (2, 256), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = m(ids, mode="chunkwise")
    out.float().mean().backward()
    gb = counters["graph_break"]
    print(f"### {mode} {variant}: graph breaks {sum(gb.values())}, stats {dict(counters['stats'])}")
    for reason, n in gb.items():
        print(f"  [{n}x] {reason[:1500]}")

orig = NG.checkpoint
for mode in ("none", "full", "selective"):
    trial(mode, "as is")
# variant: the norm-gate projection region without its nested checkpoint
NG.checkpoint = lambda fn, *a, use_reentrant=False, context_fn=None: fn(*a)
for mode in ("full",):
    trial(mode, "no nested region checkpoint")
NG.checkpoint = orig

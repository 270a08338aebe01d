# shellcheck shell=bash
# Environment for NVIDIA GPU clusters (CUDA + NCCL). Sourced by launch/torchrun.sh,
# launch/deepspeed.sh and (on every node, through torchrun.sh) launch/slurm/train.sbatch.
#
# Every setting uses ${VAR:-default}: a value already in the environment (your shell, your
# site's module, the scheduler) wins. Lines marked SITE are cluster-specific: read them,
# then set them in your job script or uncomment them here in a copy (launch with --env FILE).
# Safe to source under `set -u`; sets variables only, prints nothing.

# --- NCCL: network ----------------------------------------------------------------------
# SITE. Which InfiniBand / RoCE adapters NCCL uses for inter-node traffic. Unset, NCCL uses
# every HCA it finds, which is right on most GPU nodes (one NIC per GPU). Restrict it when a
# node also has a storage or management HCA that must not carry training traffic.
# List them with `ibv_devinfo -l`. "=" means exact names, no prefix matching.
# export NCCL_IB_HCA="${NCCL_IB_HCA:-=mlx5_0,mlx5_1,mlx5_2,mlx5_3,mlx5_4,mlx5_5,mlx5_6,mlx5_7}"

# SITE. The IP interface for NCCL's bootstrap (and its socket transport when there is no IB).
# NCCL already skips lo and docker*; name the interface when the node has several routable
# ones (e.g. a slow management Ethernet beside the fast fabric), else the bootstrap can pick
# the wrong one and hang or crawl. `ip -br addr` lists them; "^name" excludes a prefix.
# GLOO_SOCKET_IFNAME does the same for gloo (CPU collectives) and should usually match.
# export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-ib0}"
# export GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-ib0}"

# Only WARN by default: one line per problem, not the per-rank INFO flood. Set
# NCCL_DEBUG=INFO (and NCCL_DEBUG_SUBSYS=INIT,NET) when diagnosing a hang or slow start.
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"

# NVLink SHARP (multicast) is left as NCCL decides. Do not turn it on where the operator
# has set NCCL_NVLS_ENABLE=0 (some shared hosts do so on purpose); we never override it.

# --- PyTorch distributed ------------------------------------------------------------------
# On an NCCL error or a collective that exceeds its timeout, tear the process down (1)
# instead of leaving a rank hung forever: torchrun then sees the failure, the step ends, and
# the job can be requeued and resume from the last checkpoint. (Older torch read
# NCCL_ASYNC_ERROR_HANDLING; torch >= 2.2 reads the TORCH_ prefixed name.)
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"

# When a collective times out, write the flight recorder (the last N collectives of each
# rank) to disk so the hang can be diagnosed afterwards (torch >= 2.3). The buffer costs
# a few MB of host memory. Dumps go to TORCH_NCCL_DEBUG_INFO_TEMP_FILE<rank>.
export TORCH_NCCL_TRACE_BUFFER_SIZE="${TORCH_NCCL_TRACE_BUFFER_SIZE:-2000}"
export TORCH_NCCL_DUMP_ON_TIMEOUT="${TORCH_NCCL_DUMP_ON_TIMEOUT:-1}"

# --- CUDA ---------------------------------------------------------------------------------
# Let the caching allocator grow segments in place instead of allocating new fixed blocks:
# much less fragmentation with ZeRO's variable-size gather/partition buffers and changing
# sequence lengths, so fewer "reserved but unallocated" OOMs at 6.7B-13B.
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"

# CUDA_DEVICE_MAX_CONNECTIONS=1 is NOT set on purpose. Megatron-LM needs it so that its
# asynchronous tensor-parallel communication is issued before the GEMM it overlaps with;
# our fairscale tensor-parallel layers communicate synchronously and gain nothing, while a
# single hardware queue would serialise DeepSpeed's overlap_comm stream with compute.
# Set it yourself only if you add async TP/sequence-parallel overlap.

# --- CPU side -----------------------------------------------------------------------------
# Each GPU process gets its share of the node's cores (torchrun would force 1).
# shellcheck source=launch/lib/cpu_threads.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib/cpu_threads.sh"

# Log lines reach the SLURM output file as they happen, not in 8 KB bursts at exit.
export PYTHONUNBUFFERED="${PYTHONUNBUFFERED:-1}"

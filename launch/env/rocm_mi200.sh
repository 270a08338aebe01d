# shellcheck shell=bash
# Environment for AMD Instinct MI200 (MI210 / MI250 / MI250X) on ROCm: PyTorch's ROCm build
# talks to RCCL through the same "nccl" backend, and RCCL reads the NCCL_* variables.
# Sourced by launch/torchrun.sh, launch/deepspeed.sh (and through --venv_script on every
# node of a multi-node deepspeed run) and, through torchrun.sh, on every node of
# launch/slurm/train.sbatch.
#
# Every setting uses ${VAR:-default}: a value already in the environment wins. Lines marked
# SITE are cluster-specific. Safe to source under `set -u`; sets variables, makes one directory.

# --- RCCL: network ------------------------------------------------------------------------
# SITE. The IP interface for RCCL's bootstrap and socket transport. On HPE Cray EX systems
# with Slingshot (MI250X nodes) the fast NICs are hsn0..hsn3; on InfiniBand clusters ib0.
# Without it RCCL may bootstrap over the management Ethernet. `ip -br addr` lists them.
# export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-hsn0,hsn1,hsn2,hsn3}"
# export GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-hsn0}"

# SITE. InfiniBand MI200 clusters: which HCAs RCCL uses (`ibv_devinfo -l`), as for NCCL.
# export NCCL_IB_HCA="${NCCL_IB_HCA:-=mlx5_0,mlx5_1,mlx5_2,mlx5_3}"

# SITE. Slingshot: RCCL reaches the NICs through the aws-ofi-rccl plugin (libfabric, cxi
# provider), which must be on LD_LIBRARY_PATH (usually a site module). GPU-direct RDMA is
# then allowed up to the PCIe host bridge (3 = PHB), which the centers running MI250X
# systems recommend for RCCL with that plugin.
# export NCCL_NET_GDR_LEVEL="${NCCL_NET_GDR_LEVEL:-3}"
# export FI_PROVIDER="${FI_PROVIDER:-cxi}"

# Only WARN by default; NCCL_DEBUG=INFO (RCCL honours it) to see which transport and
# interface were chosen.
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"

# --- PyTorch distributed ------------------------------------------------------------------
# Same as on NVIDIA: an RCCL error or collective timeout kills the process rather than
# hanging the job, so the step fails and a requeued job resumes from the last checkpoint.
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"

# --- HIP / HSA ----------------------------------------------------------------------------
# The HIP caching allocator reads PYTORCH_HIP_ALLOC_CONF (it falls back to
# PYTORCH_CUDA_ALLOC_CONF). Expandable segments cut fragmentation as on CUDA; they need a
# recent torch on ROCm (>= 2.5 / ROCm 6) and older builds warn once and ignore the option.
export PYTORCH_HIP_ALLOC_CONF="${PYTORCH_HIP_ALLOC_CONF:-expandable_segments:True}"

# Peer-to-peer between PCIe-connected GPUs (MI210 cards) needs fine-grained PCIe memory;
# RCCL's documentation asks for this variable there. On MI250X nodes the GCDs talk over
# Infinity Fabric (xGMI) and the setting is harmless.
export HSA_FORCE_FINE_GRAIN_PCIE="${HSA_FORCE_FINE_GRAIN_PCIE:-1}"

# --- MIOpen kernel cache on node-local disk -----------------------------------------------
# MIOpen keeps its tuning database (sqlite) and compiled kernels under ~/.config/miopen and
# ~/.cache/miopen by default. With a shared home and hundreds of ranks that means sqlite
# lock contention over NFS/Lustre ("database is locked", minutes-long start-up), so point
# both at node-local storage, one directory per job and node. SITE: LOCAL_SCRATCH (or
# TMPDIR) if your nodes have a faster local disk than /tmp.
_retnet_miopen_dir="${LOCAL_SCRATCH:-${TMPDIR:-/tmp}}/miopen-${USER:-$(id -un)}-${SLURM_JOB_ID:-local}"
export MIOPEN_USER_DB_PATH="${MIOPEN_USER_DB_PATH:-$_retnet_miopen_dir}"
export MIOPEN_CUSTOM_CACHE_DIR="${MIOPEN_CUSTOM_CACHE_DIR:-$_retnet_miopen_dir}"
mkdir -p "$MIOPEN_USER_DB_PATH" "$MIOPEN_CUSTOM_CACHE_DIR" 2>/dev/null || true
unset _retnet_miopen_dir

# --- CPU side -----------------------------------------------------------------------------
# Each GPU process gets its share of the node's cores (torchrun would force 1).
# shellcheck source=launch/lib/cpu_threads.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib/cpu_threads.sh"

# Log lines reach the SLURM output file as they happen.
export PYTHONUNBUFFERED="${PYTHONUNBUFFERED:-1}"

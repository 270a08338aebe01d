# shellcheck shell=bash
# Sourced by every platform env file (launch/env/*.sh). torchrun would otherwise force
# OMP_NUM_THREADS=1 (and say so). Give each GPU process its share of the node's cores instead:
# it matters for DeepSpeed's CPU Adam (zero3_offload) and the data pipeline. `nproc` honours the
# cgroup/affinity SLURM gives the task. A value already in the environment wins.
if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
    _retnet_ppn="${GPUS_PER_NODE:-1}"
    [[ "$_retnet_ppn" =~ ^[1-9][0-9]*$ ]] || _retnet_ppn=1
    OMP_NUM_THREADS=$(( $(nproc) / _retnet_ppn ))
    (( OMP_NUM_THREADS >= 1 )) || OMP_NUM_THREADS=1
    export OMP_NUM_THREADS
    unset _retnet_ppn
fi

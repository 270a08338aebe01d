#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Start retnet_train with the DeepSpeed launcher, on one node or on the nodes of a hostfile.
#
# usage: launch/deepspeed.sh [-h] [--dry-run] [--env NAME|FILE] [--hostfile FILE] [--] [hydra overrides...]
#
#   one node:    launch/deepspeed.sh experiment=retnet_1.3b run_dir=/ckpt/r13
#   many nodes:  HOSTFILE=launch/hostfile.example launch/deepspeed.sh experiment=retnet_6.7b parallel.tp=2
#
# Many nodes: DeepSpeed reaches the other nodes by passwordless ssh (pdsh); the repository,
# the Python environment and run_dir must be at the same paths on every node (shared
# filesystem). The platform env file is sourced here and, through deepspeed's --venv_script,
# again on every node before the processes start there.
#
# Environment (all optional):
#   HOSTFILE        "host slots=N" lines (see launch/hostfile.example); as --hostfile
#   NNODES          use only the first NNODES hosts of the hostfile (deepspeed --num_nodes)
#   GPUS_PER_NODE   processes per node (default: all GPUs on one node, the slots with a hostfile)
#   INCLUDE/EXCLUDE deepspeed --include/--exclude host:slot filters, e.g. "node1:0,1"
#   MASTER_ADDR     address of the first node as the others see it (default: deepspeed picks)
#   MASTER_PORT     default 29500
#   DS_LAUNCHER     deepspeed --launcher for many nodes: pdsh (default), openmpi, mvapich, ...
#   LAUNCH_ENV      platform env file, as --env (default auto: rocm_mi200 if ROCm, else nvidia)
#   DEEPSPEED       the deepspeed command (default deepspeed)
#   DRY_RUN=1       as --dry-run: print the environment and the command, run nothing
#
# Preemption: for SLURM use launch/slurm/train.sbatch (torchrun), which turns the preemption
# signal into a checkpoint and a requeue. SIGTERM to a single-node deepspeed launcher is
# passed on to the workers, which save and exit, but the launcher does not wait for them.
set -euo pipefail

LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck disable=SC2034  # read by common.sh
LAUNCH_NAME=deepspeed.sh
# shellcheck source=common.sh
source "$LAUNCH_DIR/common.sh"

DRY_RUN="${DRY_RUN:-0}"
ENV_SEL="${LAUNCH_ENV:-auto}"
HOSTFILE="${HOSTFILE:-}"
while [[ $# -gt 0 ]]; do
    case "$1" in
        -h | --help) print_header "${BASH_SOURCE[0]}"; exit 0 ;;
        --dry-run) DRY_RUN=1; shift ;;
        --env) [[ $# -ge 2 ]] || die "--env needs a value"; ENV_SEL="$2"; shift 2 ;;
        --env=*) ENV_SEL="${1#--env=}"; shift ;;
        --hostfile) [[ $# -ge 2 ]] || die "--hostfile needs a value"; HOSTFILE="$2"; shift 2 ;;
        --hostfile=*) HOSTFILE="${1#--hostfile=}"; shift ;;
        --) shift; break ;;
        *) break ;;  # the first other argument starts the Hydra overrides
    esac
done
OVERRIDES=("$@")

CMD=("${DEEPSPEED:-deepspeed}")
if [[ -n "$HOSTFILE" ]]; then
    [[ -f "$HOSTFILE" ]] || die "hostfile not found: $HOSTFILE"
    HOSTFILE="$(cd "$(dirname "$HOSTFILE")" && pwd)/$(basename "$HOSTFILE")"
    # The hosts deepspeed will see: "name slots=N" lines, comments and blank lines skipped.
    HOSTS=()
    while read -r host rest; do
        [[ -z "$host" || "$host" == '#'* ]] && continue
        [[ "$rest" =~ slots=[0-9]+ ]] || die "bad hostfile line (want 'host slots=N'): $host $rest"
        HOSTS+=("$host")
    done <"$HOSTFILE"
    [[ ${#HOSTS[@]} -gt 0 ]] || die "no hosts in $HOSTFILE"
    NNODES="${NNODES:-${#HOSTS[@]}}"
    [[ "$NNODES" =~ ^[1-9][0-9]*$ && "$NNODES" -le ${#HOSTS[@]} ]] ||
        die "NNODES=$NNODES but $HOSTFILE lists ${#HOSTS[@]} hosts"
    CMD+=(--hostfile "$HOSTFILE" --num_nodes "$NNODES")
    [[ -n "${GPUS_PER_NODE:-}" ]] && CMD+=(--num_gpus "$GPUS_PER_NODE")
    [[ -n "${DS_LAUNCHER:-}" ]] && CMD+=(--launcher "$DS_LAUNCHER")
else
    NNODES=1
    if [[ -z "${GPUS_PER_NODE:-}" ]]; then
        GPUS_PER_NODE=$(detect_gpus)
        if [[ "$GPUS_PER_NODE" -eq 0 ]]; then
            log "no GPU visible; starting 1 process (set GPUS_PER_NODE to choose)"
            GPUS_PER_NODE=1
        fi
    fi
    CMD+=(--num_gpus "$GPUS_PER_NODE")
fi
if [[ -n "${GPUS_PER_NODE:-}" ]]; then
    [[ "$GPUS_PER_NODE" =~ ^[1-9][0-9]*$ ]] || die "GPUS_PER_NODE must be a positive integer, got '$GPUS_PER_NODE'"
    export GPUS_PER_NODE
fi
if [[ -n "${INCLUDE:-}" && -n "${EXCLUDE:-}" ]]; then die "set INCLUDE or EXCLUDE, not both"; fi
[[ -n "${INCLUDE:-}" ]] && CMD+=(--include "$INCLUDE")
[[ -n "${EXCLUDE:-}" ]] && CMD+=(--exclude "$EXCLUDE")
[[ -n "${MASTER_ADDR:-}" ]] && CMD+=(--master_addr "$MASTER_ADDR")
CMD+=(--master_port "${MASTER_PORT:-29500}")

ENV_FILE=$(resolve_env_file "$ENV_SEL")
source_env_file "$ENV_FILE"
# On other nodes the env file must be sourced there (it makes node-local directories);
# deepspeed's pdsh runner runs "source <venv_script>;" before the launcher on each node.
if [[ "$NNODES" -gt 1 && -n "$ENV_FILE" ]]; then
    CMD+=(--venv_script "$ENV_FILE")
fi
CMD+=(--module retnet_train "${OVERRIDES[@]}")

if is_true "$DRY_RUN"; then
    show_env "$ENV_FILE"
    echo "# nodes: $NNODES, processes per node: ${GPUS_PER_NODE:-slots from $HOSTFILE}"
    print_cmd "${CMD[@]}"
    exit 0
fi

log "$(print_cmd "${CMD[@]}")"
exec "${CMD[@]}"

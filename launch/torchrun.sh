#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Start retnet_train on this node with torchrun: one process per GPU, one or many nodes.
#
# usage: launch/torchrun.sh [-h] [--dry-run] [--env NAME|FILE] [--] [hydra overrides...]
#
#   one node:    launch/torchrun.sh experiment=retnet_1.3b run_dir=/ckpt/r13
#   many nodes:  run this on every node with the same NNODES, MASTER_ADDR, MASTER_PORT, RDZV_ID
#
# Environment (all optional on one node):
#   NNODES          nodes in the job (default 1; 1 means torchrun --standalone)
#   GPUS_PER_NODE   processes on this node (default: the GPUs this node can see)
#   MASTER_ADDR     rendezvous host, reachable from every node (needed when NNODES > 1)
#   MASTER_PORT     rendezvous port (default 29500)
#   RDZV_ID         job id shared by all nodes of one run (default: SLURM_JOB_ID or "retnet")
#   RDZV_BACKEND    c10d (default: node ranks assigned at rendezvous) or static
#   NODE_RANK       this node's rank 0..NNODES-1; setting it selects the static backend
#   MAX_RESTARTS    torchrun --max-restarts (default 0: a failure ends the run; requeue resumes)
#   LAUNCH_ENV      platform env file, as --env (default auto: rocm_mi200 if ROCm, else nvidia)
#   TORCHRUN        the torchrun command (default torchrun)
#   DRY_RUN=1       as --dry-run: print the environment and the command, run nothing
#   SIGNAL_RESEND_S after a stop signal, send it again to the workers every N s (default 30)
#
# Signals: SIGUSR1 or SIGTERM to this script (or, under SLURM, to every process of the step)
# make the trainer save a checkpoint and exit 0. torchrun is started with both signals
# ignored, and this script forwards them to the worker processes (torchrun's children),
# whose handler (retnet_train/train/signals.py) replaces the inherited "ignore".
#  - SIGUSR1: torchrun has no handler for it, so without the ignore it would die at once and
#    the step would end with the workers mid-save. With it, torchrun just waits for the
#    workers and exits with their status, 0 after a clean save. This is the preemption path.
#  - SIGTERM: torchrun installs its own handler (so the inherited ignore does not hold):
#    it passes SIGTERM to the workers and SIGKILLs them after a grace period. We ask newer
#    torch to leave SIGTERM alone (TORCHELASTIC_SIGNALS_TO_HANDLE) and to wait longer
#    (TORCH_ELASTIC_SHUTDOWN_TIMEOUT); older torch ignores both and kills after 30 s.
#    Prefer SIGUSR1 for a checkpoint-and-stop.
set -euo pipefail

LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck disable=SC2034  # read by common.sh
LAUNCH_NAME=torchrun.sh
# shellcheck source=common.sh
source "$LAUNCH_DIR/common.sh"

usage() { print_header "${BASH_SOURCE[0]}"; }

DRY_RUN="${DRY_RUN:-0}"
ENV_SEL="${LAUNCH_ENV:-auto}"
while [[ $# -gt 0 ]]; do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        --dry-run) DRY_RUN=1; shift ;;
        --env) [[ $# -ge 2 ]] || die "--env needs a value"; ENV_SEL="$2"; shift 2 ;;
        --env=*) ENV_SEL="${1#--env=}"; shift ;;
        --) shift; break ;;
        *) break ;;  # the first other argument starts the Hydra overrides
    esac
done
OVERRIDES=("$@")

NNODES="${NNODES:-1}"
[[ "$NNODES" =~ ^[1-9][0-9]*$ ]] || die "NNODES must be a positive integer, got '$NNODES'"
if [[ -z "${GPUS_PER_NODE:-}" ]]; then
    GPUS_PER_NODE=$(detect_gpus)
    if [[ "$GPUS_PER_NODE" -eq 0 ]]; then
        log "no GPU visible; starting 1 process (set GPUS_PER_NODE to choose)"
        GPUS_PER_NODE=1
    fi
fi
[[ "$GPUS_PER_NODE" =~ ^[1-9][0-9]*$ ]] || die "GPUS_PER_NODE must be a positive integer, got '$GPUS_PER_NODE'"
export GPUS_PER_NODE  # the env files size OMP_NUM_THREADS from it
MAX_RESTARTS="${MAX_RESTARTS:-0}"

ENV_FILE=$(resolve_env_file "$ENV_SEL")
source_env_file "$ENV_FILE"

# See "Signals" above. Both variables are read only by newer torch, ignored by older.
export TORCHELASTIC_SIGNALS_TO_HANDLE="${TORCHELASTIC_SIGNALS_TO_HANDLE:-SIGINT,SIGHUP,SIGQUIT}"
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-600}"

CMD=("${TORCHRUN:-torchrun}" "--nnodes=$NNODES" "--nproc-per-node=$GPUS_PER_NODE")
if [[ "$NNODES" -eq 1 && -z "${MASTER_ADDR:-}" ]]; then
    # One node: rendezvous on localhost with a free port, so that two jobs sharing a node
    # never collide.
    CMD+=(--standalone)
else
    [[ -n "${MASTER_ADDR:-}" ]] || die "NNODES=$NNODES needs MASTER_ADDR (the rendezvous host, e.g. the first node)"
    MASTER_PORT="${MASTER_PORT:-29500}"
    if [[ -n "${NODE_RANK:-}" ]]; then
        RDZV_BACKEND="${RDZV_BACKEND:-static}"
    else
        RDZV_BACKEND="${RDZV_BACKEND:-c10d}"
    fi
    case "$RDZV_BACKEND" in
        static)
            [[ "${NODE_RANK:-}" =~ ^[0-9]+$ && "${NODE_RANK}" -lt "$NNODES" ]] ||
                die "RDZV_BACKEND=static needs NODE_RANK in 0..$((NNODES - 1)), got '${NODE_RANK:-}'"
            CMD+=("--node-rank=$NODE_RANK" "--master-addr=$MASTER_ADDR" "--master-port=$MASTER_PORT")
            ;;
        c10d)
            # The node whose address matches MASTER_ADDR hosts the rendezvous store; the
            # others connect to it. Node ranks are handed out as nodes join.
            CMD+=(--rdzv-backend=c10d "--rdzv-endpoint=$MASTER_ADDR:$MASTER_PORT"
                "--rdzv-id=${RDZV_ID:-${SLURM_JOB_ID:-retnet}}")
            ;;
        *) die "RDZV_BACKEND must be c10d or static, got '$RDZV_BACKEND'" ;;
    esac
fi
CMD+=("--max-restarts=$MAX_RESTARTS" -m retnet_train "${OVERRIDES[@]}")

if is_true "$DRY_RUN"; then
    show_env "$ENV_FILE"
    echo "# nodes: $NNODES, processes per node: $GPUS_PER_NODE"
    print_cmd "${CMD[@]}"
    exit 0
fi

log "$(print_cmd "${CMD[@]}")"

STOP_SIGNAL=""
CHILD=""
forward() {  # send signal $1 to the worker processes (children of torchrun)
    [[ -n "$CHILD" ]] || return 0
    pkill "-$1" -P "$CHILD" 2>/dev/null || true
}
# shellcheck disable=SC2329  # called from the traps below
on_stop() {
    if [[ -z "$STOP_SIGNAL" ]]; then
        log "SIG$1: asking the workers to save a checkpoint and exit"
    fi
    STOP_SIGNAL="$1"
    forward "$1"
}
trap 'on_stop TERM' TERM
trap 'on_stop USR1' USR1
# Ctrl-C reaches torchrun directly (same process group); it stops its workers itself.
trap 'log "SIGINT: torchrun stops the workers"' INT

# The subshell ignores TERM and USR1 before exec: torchrun inherits the ignore (see top).
( trap '' TERM USR1; exec "${CMD[@]}" ) &
CHILD=$!

# `wait` returns early whenever a trapped signal arrives; keep waiting until torchrun is
# gone. After a stop signal, send it again every SIGNAL_RESEND_S seconds: a worker that was
# still importing or building the model had the signal ignored and installs its handler later.
RESEND="${SIGNAL_RESEND_S:-30}"
since=0
while kill -0 "$CHILD" 2>/dev/null; do
    if [[ -z "$STOP_SIGNAL" || "$RESEND" -le 0 ]]; then
        wait "$CHILD" || true
    else
        sleep 1
        since=$((since + 1))
        if [[ "$since" -ge "$RESEND" ]]; then
            since=0
            forward "$STOP_SIGNAL"
        fi
    fi
done
rc=0
wait "$CHILD" || rc=$?
if [[ -n "$STOP_SIGNAL" ]]; then
    log "torchrun exited with $rc after SIG$STOP_SIGNAL"
fi
exit "$rc"

#!/usr/bin/env bash
# The multi-GPU measurements of one node, phase by phase; every bench run appends its table to
# bench/RESULTS.md and all output goes to LOG_DIR/PHASE.log.
#
#   bash bench/multi_gpu.sh scaling 6.7b 13b export      # any phases, in the order given
#
#   scaling  retnet_1.3b, 8192 tokens per GPU per step, on 1, 2, 4 and 8 GPUs (up to NGPUS), with
#            ZeRO-1 and ZeRO-2 (SCALING_ZERO, default "1 2")
#   6.7b     retnet_6.7b on 4 GPUs at one global batch (32768 tokens): ZeRO-3 without tensor
#            parallelism (6.7b-zero3), tp=2 x dp=2 (6.7b-tp2) and tp=4 (6.7b-tp4), ZeRO-1 (same
#            8192 tokens per GPU per micro-batch; the tensor-parallel runs accumulate 2 and 4)
#   13b      retnet_13b on 4 GPUs, ZeRO-3 over 4 (13b-zero3) and tp=4 (13b-tp4), 32768 tokens
#            per step, 12 steps
#   13b-8    retnet_13b on 8 GPUs at 65536 tokens per step: tp=8 (13b8-tp8), tp=4 x dp=2 (13b8-tp4),
#            tp=2 x dp=4 (13b8-tp2), all ZeRO-1, and ZeRO-3 over 8 (13b8-zero3)
#   cp       retnet_1.3b, one sequence per step split over NGPUS GPUs (parallel.cp), full activation
#            checkpointing, at each of CP_LENGTHS (default 262144 524288 1048576 tokens); the
#            anchor first: cp=1, T=32768 on one GPU
#   resume   a run on NGPUS GPUs stopped by SIGTERM after step 30 of 60 and resumed there, and the
#            same checkpoint resumed on NGPUS/2 GPUs (elastic: twice the gradient accumulation);
#            bench/resume_check.py compares their losses with an uninterrupted run's
#   export   a tp=2 bf16 ZeRO-1 run on 2 GPUs checkpoints, is exported to one model, decoded
#            from, and starts a tp=1 run whose first loss is the exported model's
#   build    retnet_13b built sharded on 2 GPUs (bench/sharded_build.py): ZeRO-3 over 2, tp=2, and
#            the unsharded build of before; seconds, shard and peak memory per rank
#
# Env: LOG_DIR (default bench/logs), RUN_TIMEOUT (seconds per run, default 420), NGPUS (default 4),
# SCALING_ZERO, CP_LENGTHS (above), RESUME_OVERRIDES (config overrides added to the resume runs).
set -uo pipefail
cd "$(dirname "$0")/.." || exit
LOG_DIR="${LOG_DIR:-bench/logs}"
RUN_TIMEOUT="${RUN_TIMEOUT:-420}"
NGPUS="${NGPUS:-4}"
mkdir -p "$LOG_DIR"
# torchrun sets one OpenMP thread per rank; the host side (DeepSpeed, data) gets a few more
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"

gpus() {  # gpus N -> 0,1,...,N-1
    seq -s, 0 $(($1 - 1))
}

bench() {  # bench LOG NPROC ARGS... : one bench/train_throughput.py run under torchrun
    local log=$1 n=$2
    shift 2
    echo "=== $(date +%T) torchrun --nproc_per_node $n bench/train_throughput.py $*" | tee -a "$log"
    CUDA_VISIBLE_DEVICES="$(gpus "$n")" timeout "$RUN_TIMEOUT" \
        torchrun --standalone --nproc_per_node "$n" bench/train_throughput.py "$@" 2>&1 | tee -a "$log"
    echo "=== $(date +%T) exit ${PIPESTATUS[0]}" | tee -a "$log"
}

phase_scaling() {
    local n zero
    for zero in ${SCALING_ZERO:-1 2}; do
        for n in 1 2 4 8; do
            [ "$n" -le "$NGPUS" ] || continue
            bench "$LOG_DIR/scaling.log" "$n" --preset retnet_1.3b --seq-len 2048 --tokens-per-step 8192 \
                --zero "$zero" --steps 8 --warmup 3
        done
    done
}

phase_6.7b() {  # phase_6.7b LAYOUT: zero3 | tp2 | tp4
    local args=(--preset retnet_6.7b --seq-len 2048 --tokens-per-step 8192 --steps 5 --warmup 2)
    case "$1" in
        zero3) args+=(--zero 3) ;;
        tp2) args+=(--tp 2 --zero 1 --grad-accum 2) ;;
        tp4) args+=(--tp 4 --zero 1 --grad-accum 4) ;;
    esac
    bench "$LOG_DIR/6.7b.log" 4 "${args[@]}"
}

phase_13b() {  # phase_13b LAYOUT: zero3 | tp4
    local args=(--preset retnet_13b --seq-len 2048 --steps 8 --warmup 4)
    case "$1" in
        # ZeRO-3: 16 bytes of state per parameter over 4 GPUs; 2 sequences per micro-batch leave room
        # for the activations of 40 layers without checkpointing
        zero3) args+=(--zero 3 --tokens-per-step 4096 --grad-accum 2) ;;
        tp4) args+=(--tp 4 --zero 1 --tokens-per-step 8192 --grad-accum 4) ;;
    esac
    bench "$LOG_DIR/13b.log" 4 "${args[@]}"
}

phase_13b8() {  # phase_13b8 LAYOUT: tp8 | tp4 | tp2 | zero3 (8 GPUs, 65536 tokens per step)
    local args=(--preset retnet_13b --seq-len 2048 --steps 6 --warmup 3)
    case "$1" in
        tp8) args+=(--tp 8 --zero 1 --tokens-per-step 8192 --grad-accum 8) ;;
        tp4) args+=(--tp 4 --zero 1 --tokens-per-step 8192 --grad-accum 4) ;;
        tp2) args+=(--tp 2 --zero 1 --tokens-per-step 8192 --grad-accum 2) ;;
        zero3) args+=(--zero 3 --tokens-per-step 4096 --grad-accum 2) ;;
    esac
    bench "$LOG_DIR/13b-8.log" 8 "${args[@]}"
}

phase_cp() {
    local log="$LOG_DIR/cp.log" length
    bench "$log" 1 --preset retnet_1.3b --seq-len 32768 --micro-batch 1 --zero 2 --steps 5 --warmup 2
    for length in ${CP_LENGTHS:-262144 524288 1048576}; do
        bench "$log" "$NGPUS" --preset retnet_1.3b --seq-len "$length" --micro-batch 1 --cp "$NGPUS" \
            --act-ckpt --zero 2 --steps 3 --warmup 2
    done
}

train_run() {  # train_run LOG NPROC RUN_DIR ARGS...: python -m retnet_train under torchrun, in the background
    local log=$1 n=$2 dir=$3
    shift 3
    echo "=== $(date +%T) torchrun --nproc_per_node $n -m retnet_train run_dir=$dir $*" >>"$log"
    CUDA_VISIBLE_DEVICES="$(gpus "$n")" timeout "$RUN_TIMEOUT" torchrun --standalone --nproc_per_node "$n" \
        -m retnet_train run_dir="$dir" "$@" >>"$log" 2>&1 &
}

phase_resume() {
    local log="$LOG_DIR/resume.log" ref=/tmp/resume_ref run=/tmp/resume_run half=/tmp/resume_half
    local n=$NGPUS h=$((NGPUS / 2)) stop=30 pid
    # retnet_tiny at the big presets' head sizes, synthetic tokens; the global batch stays 8 x 512
    # tokens per GPU of the first run, so NGPUS/2 GPUs accumulate two micro-batches per step
    local args=(model=retnet_tiny model.d_model=512 model.n_heads=2 trainer.mode=parallel
        trainer.data_source=synthetic trainer.seq_len=512 trainer.micro_batch_size=8
        trainer.global_batch_tokens=$((8 * 512 * n)) trainer.max_steps=60 trainer.log_every=1 trainer.eval_every=0
        deepspeed=zero2 optim.lr=3e-3 optim.warmup_steps=5 checkpoint.every=0 logging.wandb.mode=disabled)
    local extra=()
    read -ra extra <<<"${RESUME_OVERRIDES:-}"  # e.g. a smaller model for a CPU rehearsal
    args+=("${extra[@]}")
    rm -rf "$ref" "$run" "$half"
    train_run "$log" "$n" "$ref" "${args[@]}"
    wait $!
    # stop the second run once it has logged step $stop: the trainer saves a checkpoint after the
    # step it is in and exits 0; the resumes continue from that checkpoint
    train_run "$log" "$n" "$run" "${args[@]}"
    pid=$!
    until grep -q "\"step\": $stop," "$run/metrics.jsonl" 2>/dev/null; do
        kill -0 "$pid" 2>/dev/null || break
        sleep 1
    done
    kill -TERM "$pid" 2>/dev/null
    wait "$pid"
    cp -r "$run" "$half"
    train_run "$log" "$n" "$run" "${args[@]}"
    wait $!
    train_run "$log" "$h" "$half" "${args[@]}"
    wait $!
    python bench/resume_check.py "$ref" "$run" "$half" --after "$stop" --labels "resumed on $n" "resumed on $h" \
        2>&1 | tee -a "$log"
}

phase_export() {
    local log="$LOG_DIR/export.log" run=/tmp/tp2_export_run out=/tmp/tp2_export
    # retnet_tiny widened to the big presets' head sizes (key 256, value 512); the parallel form, so
    # a fresh machine compiles no Triton kernels for this check (the bench phases run fla under tp)
    local model=(model.d_model=512 model.n_heads=2 trainer.mode=parallel)
    rm -rf "$run" "$out"
    echo "=== $(date +%T) tp=2 run on 2 GPUs, checkpoint, export, decode, restart at tp=1" | tee -a "$log"
    CUDA_VISIBLE_DEVICES=0,1 timeout "$RUN_TIMEOUT" torchrun --standalone --nproc_per_node 2 -m retnet_train \
        model=retnet_tiny "${model[@]}" trainer.data_source=synthetic trainer.seq_len=512 \
        trainer.micro_batch_size=8 trainer.global_batch_tokens=8192 trainer.max_steps=40 trainer.log_every=5 \
        trainer.eval_every=0 deepspeed=zero1 parallel.tp=2 optim.lr=3e-3 optim.warmup_steps=5 \
        checkpoint.every=20 run_dir="$run" name=tp2_export logging.wandb.mode=disabled 2>&1 | tee -a "$log"
    find "$run/checkpoints" -maxdepth 2 | sort | tee -a "$log"
    timeout 300 python -m retnet_train.export "$run" "$out" 2>&1 | tee -a "$log"
    timeout 300 python -m retnet_train.generate checkpoint="$out" prompt_ids="[1,2,3,4]" max_new_tokens=24 \
        device=cuda 2>&1 | tee -a "$log"
    # the first loss of a run started from the export is the exported model on a fresh batch
    bench "$log" 1 --preset retnet_tiny --seq-len 512 --micro-batch 8 --steps 2 --warmup 1 --no-save --mode parallel \
        checkpoint.init_from="$out" "${model[@]:0:2}"
}

phase_build() {
    local log="$LOG_DIR/build.log"
    echo "=== $(date +%T) torchrun --nproc_per_node 2 bench/sharded_build.py" | tee -a "$log"
    CUDA_VISIBLE_DEVICES=0,1 timeout "$RUN_TIMEOUT" torchrun --standalone --nproc_per_node 2 \
        bench/sharded_build.py --preset retnet_13b --layouts zero3 tp unsharded 2>&1 | tee -a "$log"
    echo "=== $(date +%T) exit ${PIPESTATUS[0]}" | tee -a "$log"
}

for phase in "$@"; do
    case "$phase" in
        scaling | export | build | cp | resume) "phase_$phase" ;;
        6.7b) phase_6.7b zero3; phase_6.7b tp2; phase_6.7b tp4 ;;
        13b) phase_13b zero3; phase_13b tp4 ;;
        13b-8) phase_13b8 tp8; phase_13b8 tp4; phase_13b8 tp2; phase_13b8 zero3 ;;
        13b8-tp8 | 13b8-tp4 | 13b8-tp2 | 13b8-zero3) phase_13b8 "${phase#*-}" ;;
        6.7b-zero3 | 6.7b-tp2 | 6.7b-tp4 | 13b-zero3 | 13b-tp4) "phase_${phase%-*}" "${phase#*-}" ;;
        *) echo "unknown phase: $phase (scaling, 6.7b[-zero3|-tp2|-tp4], 13b[-zero3|-tp4]," \
                "13b-8 (13b8-tp8|-tp4|-tp2|-zero3), cp, resume, export, build)" >&2; exit 2 ;;
    esac
done

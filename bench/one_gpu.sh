#!/usr/bin/env bash
# The one-GPU measurements behind issues 10 (training) and 11 (decoding), phase by phase; every
# bench run appends its table to bench/RESULTS.md and all output goes to LOG_DIR/PHASE.log.
# Each phase fits one ten-minute slot of a shared GPU machine.
#
#   bash bench/one_gpu.sh decode decode-6.7b      # any phases, in the order given
#
#   decode       the gpu-marked tests of the decoding kernels and engine (a broken kernel shows up
#                before any timing), the retnet_1.3b / transformer_1.3b step against the
#                memory-bandwidth floor (the engine's default state window, then the state written
#                every token), one layer's decoding kernel against the unfused kernels (with its
#                tile sweep and state windows), and where the compiled step's time goes at batch 1 and 16
#   decode-6.7b  retnet_6.7b against transformer_6.7b: memory, throughput at the largest batch that
#                fits, latency against the batch (the paper's inference figure); memory at equal
#                batch 15 too (the Transformer's largest at 8k on 80 GB)
#   train        retnet_1.3b through the trainer (ZeRO-2, the multi-GPU default, and ZeRO-0, the one-GPU
#                fast path; TRAIN_SETUPS), in the plain loop and fla's RetNet-1.3B, compiled, 8 x 2048
#                tokens, each step profiled; our RetNet with each model.retention_keep of RETENTION_KEEP
#   train-long   the same at 2 x 8192 tokens beside our Transformer, eager and compiled (the memory
#                comparison)
#   memory       issue 10's memory bar at 2 x 8192 tokens, like for like: the trainer (zero0:bf16_autocast)
#                and our Transformer compiled, each without and at trainer.activation_memory_budget 0.3
#                (the compiler recomputes what does not fit, in both alike), beside fla
#   memory-curve the trainer's speed against its peak memory at budgets none, 0.5, 0.4, 0.3, 0.2 (2 x 8192;
#                the chart bench/train_step_memory_budget_T8192.png)
#   float8       trainer.float8 (fp8 linear layers, torchao) at tensorwise and rowwise scaling against none,
#                the trainer at zero0:auto beside fla, 8 x 2048 then 2 x 8192 tokens; the gpu-marked fp8
#                tests first
#   kernels      retention forward + backward, ours against every fla path, 16k tokens; then each of our
#                launches under Nsight Compute (throughput, occupancy, stall reasons)
#   bars         issue 10's two speed bars in the fastest setup measured: the gpu-marked retention and
#                compile tests, our retention launches one by one, our retention op (keep both) against
#                fla's chunk_simple_gla in 3 rounds, and the trainer with experiment retnet_1.3b_1gpu's
#                keys (BEST_SETUP) against fla's RetNet-1.3B at 8 x 2048 and 2 x 8192 in 2 rounds
#   long-budget  T=131072 through the trainer, compiled: every block fully checkpointed (what the 128k
#                experiment did before) against no checkpointing at trainer.activation_memory_budget 0.2
#                (the experiment's 0.1 runs in `long`)
#   ckpt         where full activation checkpointing's time goes: retnet_1.3b through the trainer,
#                compiled, 8 x 2048, profiled fully checkpointed and not (1.19x on an H100 since 3166b75;
#                1.7x while a graph break ran checkpointed blocks eagerly)
#   long         issue 10's long-sequence bar, compiled, through the trainer: T=2048 x 8 without
#                checkpointing (the reference), the 128k experiment as written (>= 90% of its tokens/s),
#                T=32768 x 1 without checkpointing (fits 80 GB), then the 64k experiment as written
#
# Env: LOG_DIR (default bench/logs), RUN_TIMEOUT (seconds per bench run, default 300),
# TRAIN_SETUPS (default "zero2:auto zero0:auto"; auto at ZeRO-0 is bf16_autocast), RETENTION_KEEP (default
# "none both"), BEST_SETUP (the bars phase's --trainer-setup; default: retnet_1.3b_1gpu's keys).
set -uo pipefail
cd "$(dirname "$0")/.." || exit
LOG_DIR="${LOG_DIR:-bench/logs}"
RUN_TIMEOUT="${RUN_TIMEOUT:-300}"
read -r -a TRAIN_SETUPS <<< "${TRAIN_SETUPS:-zero2:auto zero0:auto}"
read -r -a RETENTION_KEEP <<< "${RETENTION_KEEP:-none both}"
BEST_SETUP="${BEST_SETUP:-zero0:auto:tensorwise:bf16:float8_fast_accum=output_grad_input:compile_tuning=coordinate_descent:compile_pdl=true}"
mkdir -p "$LOG_DIR"
export PYTHONUNBUFFERED=1

run() {  # run LOG COMMAND...: one command, its output appended to LOG, its exit status logged
    local log=$1
    shift
    echo "=== $(date +%T) $*" | tee -a "$log"
    timeout "$RUN_TIMEOUT" "$@" 2>&1 | tee -a "$log"
    echo "=== $(date +%T) exit ${PIPESTATUS[0]}" | tee -a "$log"
}

phase_decode() {
    local log="$LOG_DIR/decode.log"
    run "$log" python -m pytest -q -m gpu tests/test_decode_step.py tests/test_inference.py
    run "$log" python bench/decode.py --sections step --compile
    run "$log" python bench/decode.py --sections step --compile --state-window 1 --step-pair retnet_1.3b,retnet_tiny
    run "$log" python bench/decode_kernel.py --batches 1 16 64 --sweep --windows 2 4 8
    run "$log" python bench/decode_profile.py --batches 1 16 --compile
}

phase_decode_67b() {
    run "$LOG_DIR/decode-6.7b.log" python bench/decode.py --pair retnet_6.7b,transformer_6.7b \
        --sections memory,throughput,latency --contexts 1024,4096,8192,16384,32768
    # memory at equal batch also at the Transformer's largest batch at 8k on an 80 GB card (15)
    run "$LOG_DIR/decode-6.7b.log" python bench/decode.py --pair retnet_6.7b,transformer_6.7b \
        --sections memory --memory-batch 15 --contexts 8192
}

phase_train() {  # phase_train T: the trainer setups, the plain loop and fla at T (16384 tokens per step)
    run "$LOG_DIR/train.log" python bench/train_step.py --runs trainer plain fla --kernels triton --compile \
        --trainer-setup "${TRAIN_SETUPS[@]}" --retention-keep "${RETENTION_KEEP[@]}" --seq-len "$1" --steps 4 \
        --warmup 2 --profile
}

phase_train_long() {
    phase_train 8192
    # our Transformer eager and compiled (the RetNet rows above are compiled: the memory bar compares
    # like with like)
    run "$LOG_DIR/train.log" python bench/train_step.py --runs transformer --seq-len 8192 --steps 4 --warmup 2
    run "$LOG_DIR/train.log" python bench/train_step.py --runs transformer --compile --seq-len 8192 --steps 4 --warmup 2
}

phase_long() {
    local log="$LOG_DIR/long.log"
    run "$log" python bench/train_throughput.py --seq-len 2048 --tokens-per-step 16384 --compile --steps 5 --warmup 3
    run "$log" python bench/train_throughput.py --experiment retnet_1.3b_128k --steps 3 --warmup 2
    run "$log" python bench/train_throughput.py --seq-len 32768 --compile --steps 3 --warmup 2
    run "$log" python bench/train_throughput.py --experiment retnet_1.3b_64k --steps 3 --warmup 2
}

phase_long_budget() {
    local log="$LOG_DIR/long-budget.log"
    run "$log" python bench/train_throughput.py --seq-len 131072 --act-ckpt --compile --steps 3 --warmup 2
    run "$log" python bench/train_throughput.py --seq-len 131072 --compile --steps 3 --warmup 2 \
        trainer.activation_memory_budget=0.2
}

phase_ckpt() {
    local log="$LOG_DIR/ckpt.log"
    run "$log" python bench/train_throughput.py --seq-len 2048 --tokens-per-step 16384 --act-ckpt --compile --steps 3 \
        --warmup 2 --profile
    run "$log" python bench/train_throughput.py --seq-len 2048 --tokens-per-step 16384 --compile --steps 3 --warmup 2 \
        --profile
}

phase_memory() {
    # five compiled 1.3B processes in one bench run (each compiles afresh on a new machine: ~2 min)
    local RUN_TIMEOUT=$((2 * RUN_TIMEOUT))
    # retention_keep none: the leanest setting (both holds about 4.5 GiB more at 2 x 8192)
    local common=(--kernels triton --compile --trainer-setup zero0:bf16_autocast --retention-keep none --seq-len 8192
                  --steps 4 --warmup 2)
    run "$LOG_DIR/memory.log" python bench/train_step.py --runs trainer transformer fla "${common[@]}" --memory-budget none 0.3
}

phase_memory_curve() {
    local RUN_TIMEOUT=$((2 * RUN_TIMEOUT))  # five trainer processes, as in phase_memory
    run "$LOG_DIR/memory-curve.log" python bench/train_step.py --runs trainer --kernels triton --compile \
        --trainer-setup zero0:bf16_autocast --retention-keep none --seq-len 8192 --steps 4 --warmup 2 \
        --memory-budget none 0.5 0.4 0.3 0.2
}

phase_float8() {  # trainer.float8 against the precision's own matmuls and fla, at each length in its own run
    local t
    run "$LOG_DIR/float8.log" python -m pytest -q -m gpu tests/test_float8.py
    for t in 2048 8192; do
        run "$LOG_DIR/float8.log" python bench/train_step.py --runs trainer fla --kernels triton --compile \
            --trainer-setup zero0:auto zero0:auto:tensorwise zero0:auto:rowwise --seq-len "$t" --steps 4 --warmup 2
    done
}

phase_kernels() {
    run "$LOG_DIR/kernels.log" python bench/retention_kernels.py --tokens 16384 --lengths 2048,8192 --profile
    # where each launch's warps wait (Nsight Compute; needs ncu and a machine that lets it read the counters)
    run "$LOG_DIR/kernels.log" python bench/retention_stalls.py
}

phase_bars() {
    local log="$LOG_DIR/bars.log"
    run "$log" python -m pytest -q -m gpu tests/test_retention_triton.py tests/test_kernels_choice.py
    run "$log" python bench/retention_launches.py
    run "$log" python bench/retention_host.py
    run "$log" python bench/retention_kernels.py --tokens 16384 --lengths 2048,8192 --rounds 3 \
        --only "fla chunk_simple_gla,triton keep both"
    # eight runs, the first ones compiling: one round of both lengths took 316 s on an H200 whose caches
    # an earlier run had filled, and did not finish in 330 s from cold (bench/RESULTS.md, 2026-12-07)
    local RUN_TIMEOUT=$((4 * RUN_TIMEOUT))
    run "$log" python bench/train_step.py --runs fla trainer --kernels triton --compile --trainer-setup "$BEST_SETUP" \
        --seq-len 2048 8192 --steps 3 --warmup 2 --rounds 2
}

for phase in "$@"; do
    case "$phase" in
        decode) phase_decode ;;
        decode-6.7b) phase_decode_67b ;;
        train) phase_train 2048 ;;
        train-long) phase_train_long ;;
        kernels) phase_kernels ;;
        bars) phase_bars ;;
        memory) phase_memory ;;
        memory-curve) phase_memory_curve ;;
        float8) phase_float8 ;;
        long) phase_long ;;
        long-budget) phase_long_budget ;;
        ckpt) phase_ckpt ;;
        *) echo "unknown phase: $phase (decode, decode-6.7b, train, train-long, memory, memory-curve, float8, kernels, bars, long, long-budget, ckpt)" >&2
           exit 2 ;;
    esac
done

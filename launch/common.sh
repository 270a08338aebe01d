# shellcheck shell=bash
# Helpers shared by launch/*.sh and launch/slurm/train.sbatch. Sourced, never run.
# Callers set LAUNCH_DIR (this directory, absolute) before sourcing.

log() { printf '[%s] %s\n' "${LAUNCH_NAME:-launch}" "$*" >&2; }
die() { log "error: $*"; exit 2; }

# print_header FILE: the script's leading comment block (after the shebang and shellcheck lines).
print_header() {
    local line started=0
    while IFS= read -r line; do
        if [[ "$line" == '#!'* || "$line" == '# shellcheck'* ]]; then continue; fi
        if [[ "$line" == '#SBATCH'* ]]; then
            started=1
            printf '%s\n' "$line"
        elif [[ "$line" == '#'* ]]; then
            started=1
            line="${line#\#}"
            printf '%s\n' "${line# }"
        elif [[ "$started" -eq 1 ]]; then
            break
        fi
    done <"$1"
}

# is_true VALUE: 1/true/yes/on (any case) -> success.
is_true() {
    case "${1,,}" in 1 | true | yes | on) return 0 ;; *) return 1 ;; esac
}

# print_cmd ARGS...: one line, shell-quoted, so that it can be pasted back into a shell.
print_cmd() {
    local out="" a
    for a in "$@"; do out+="$(printf '%q' "$a") "; done
    printf '%s\n' "${out% }"
}

# detect_gpus: number of GPUs this process can see (CUDA or ROCm), 0 when none.
# Order: the *_VISIBLE_DEVICES variables a scheduler or the user set, then the vendor tools,
# then torch itself (slow: imports torch).
detect_gpus() {
    local v n _ids
    for v in CUDA_VISIBLE_DEVICES HIP_VISIBLE_DEVICES ROCR_VISIBLE_DEVICES; do
        if [[ -n "${!v:-}" ]]; then
            IFS=, read -r -a _ids <<<"${!v}"
            echo "${#_ids[@]}"
            return
        fi
    done
    if command -v nvidia-smi >/dev/null 2>&1; then
        n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
        if [[ "$n" -gt 0 ]]; then echo "$n"; return; fi
    fi
    n=$("${PYTHON:-python}" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
    echo "${n:-0}"
}

# resolve_env_file NAME_OR_PATH: prints the env file to source, or nothing for "none".
#   auto        -> rocm_mi200 when ROCm is installed (ROCM_PATH, /opt/rocm or rocm-smi), else nvidia
#   nvidia, rocm_mi200, ... -> $LAUNCH_DIR/env/NAME.sh
#   a path      -> that file (a site's own settings)
resolve_env_file() {
    local sel="${1:-auto}"
    case "$sel" in
        none | "") return 0 ;;
        auto)
            if [[ -n "${ROCM_PATH:-}" || -d /opt/rocm ]] || command -v rocm-smi >/dev/null 2>&1; then
                sel=rocm_mi200
            else
                sel=nvidia
            fi
            ;;
    esac
    if [[ "$sel" == */* || "$sel" == *.sh ]]; then
        [[ -f "$sel" ]] || die "env file not found: $sel"
        printf '%s\n' "$sel"
    else
        if [[ ! -f "$LAUNCH_DIR/env/$sel.sh" ]]; then
            local have="" f
            for f in "$LAUNCH_DIR"/env/*.sh; do have+="$(basename "$f" .sh) "; done
            die "unknown platform '$sel' (have: ${have}none, or a file path)"
        fi
        printf '%s\n' "$LAUNCH_DIR/env/$sel.sh"
    fi
}

# source_env_file FILE: source it into this shell (exported variables reach the trainer).
# Sets ENV_FILE_CHANGES to the KEY=VALUE lines it added or changed, for the dry-run listing.
ENV_FILE_CHANGES=""
source_env_file() {
    local file="$1" before after
    [[ -n "$file" ]] || return 0
    before=$(env | LC_ALL=C sort)
    # shellcheck source=/dev/null
    source "$file"
    after=$(env | LC_ALL=C sort)
    ENV_FILE_CHANGES=$(LC_ALL=C comm -13 <(printf '%s\n' "$before") <(printf '%s\n' "$after"))
}

# show_env FILE: the dry-run header naming the env file and what it set.
show_env() {
    local file="$1" line
    if [[ -z "$file" ]]; then
        echo "# platform env: none"
        return
    fi
    echo "# platform env: $file"
    while IFS= read -r line; do
        [[ -n "$line" ]] && echo "export $(printf '%s=%q' "${line%%=*}" "${line#*=}")"
    done <<<"$ENV_FILE_CHANGES"
}

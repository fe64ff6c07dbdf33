#!/usr/bin/env bash
# The model-family figures (issue 19) on one H200 (the device tool's nvidia-h200): offline throughput and
# batch-1 latency of dummy presets in bf16, each against transformers (`--compare-hf`, the same requests,
# the same process, after our engine has freed the card), and the fused MoE kernel against its torch
# reference. Usage: benchmarks/h200_families.sh tests|moe_kernel|gemma-2-9b|phi-3-mini-4k|mixtral-8x7b ...
# (mixtral-8x7b-throughput, mixtral-8x7b-latency and gemma-2-9b-latency run one half, for one call each).
# `tests` runs the GPU-only tests (Triton kernels with sliding windows and soft caps, Gemma and MoE on CUDA).
set -uo pipefail
OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
bench() {  # name, then the bench arguments
    local name=$1
    shift
    echo "== $name: python -m engine.bench $*"
    # The whole log is kept (engine load and graph capture times are INFO lines): a run cut short by a
    # time limit still says where its time went (`tail $OUT/$name.log`).
    python3 -m engine.bench "$@" --json "$OUT/$name.json" >"$OUT/$name.log" 2>&1
    grep -v "^INFO" "$OUT/$name.log" | tail -4
}
for part in "$@"; do
    case $part in
        tests) python3 -m pytest -q -m gpu tests/engine tests/kernels -p no:cacheprovider 2>&1 | tail -15 ;;
        moe_kernel) python3 -m engine.bench.fused_moe --json "$OUT/fused_moe.json" 2>&1 | grep -v "^INFO" ;;
        mixtral-8x7b|mixtral-8x7b-throughput|mixtral-8x7b-latency)
            # 93 GB of weights: little KV room, so fewer and shorter requests, and CUDA graphs only up to the
            # 128 sequences these runs have (each engine start builds the model and captures its graphs).
            model=(--model dummy:mixtral-8x7b --dtype bfloat16 --max-model-len 2048 --max-num-seqs 128)
            [ "$part" = mixtral-8x7b-latency ] || bench mixtral-8x7b_throughput throughput "${model[@]}" \
                --num-prompts 128 --input-len 128 --output-len 128 --ignore-eos --batch-size 32 --compare-hf
            [ "$part" = mixtral-8x7b-throughput ] || bench mixtral-8x7b_latency latency "${model[@]}" --input-len 32 \
                --output-len 128 --batch-size 1 --num-iters-warmup 1 --num-iters 3 --compare-hf ;;
        gemma-2-9b-latency)
            bench gemma-2-9b_latency latency --model dummy:gemma-2-9b --dtype bfloat16 --max-model-len 4096 \
                --input-len 32 --output-len 128 --batch-size 1 --num-iters-warmup 2 --num-iters 3 --compare-hf ;;
        *)
            model=(--model dummy:$part --dtype bfloat16 --max-model-len 4096)
            bench "${part}_throughput" throughput "${model[@]}" --num-prompts 256 --input-len 256 --output-len 256 \
                --ignore-eos --batch-size 64 --compare-hf
            bench "${part}_latency" latency "${model[@]}" --input-len 32 --output-len 128 --batch-size 1 \
                --num-iters-warmup 2 --num-iters 3 --compare-hf ;;
    esac
done

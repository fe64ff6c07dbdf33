#!/usr/bin/env bash
# The model-family figures (issue 19) on one H200 (the device tool's nvidia-h200): offline throughput and
# batch-1 latency of dummy presets in bf16, each against transformers (`--compare-hf`, the same requests,
# the same process, after our engine has freed the card), and the fused MoE kernel against its torch
# reference. Usage: benchmarks/h200_families.sh tests|moe_kernel|gemma-2-9b|phi-3-mini-4k|mixtral-8x7b ...
# (mixtral-8x7b-throughput, mixtral-8x7b-latency and gemma-2-9b-latency run one half, for one call each).
# `tests` runs the GPU-only tests (Triton kernels with sliding windows and soft caps, Gemma and MoE on CUDA).
source "$(dirname "$0")/h200_common.sh"
for part in "$@"; do
    case $part in
        tests) python3 -m pytest -q -m gpu tests/engine tests/kernels -p no:cacheprovider 2>&1 | tail -15 ;;
        moe_kernel) python3 -m engine.bench.fused_moe --json "$OUT/fused_moe.json" 2>&1 | grep -v "^INFO" ;;
        mixtral-8x7b|mixtral-8x7b-throughput|mixtral-8x7b-latency)
            # 93 GB of weights: little KV room, so fewer and shorter requests, and CUDA graphs only up to the
            # 128 sequences these runs have (each engine start builds the model and captures its graphs).
            model=(--model dummy:mixtral-8x7b --dtype bfloat16 --max-model-len 2048 --max-num-seqs 128)
            [ "$part" = mixtral-8x7b-latency ] || bench mixtral-8x7b_throughput 4 throughput "${model[@]}" \
                --num-prompts 128 --input-len 128 --output-len 128 --ignore-eos --batch-size 32 --compare-hf
            [ "$part" = mixtral-8x7b-throughput ] || bench mixtral-8x7b_latency 4 latency "${model[@]}" --input-len 32 \
                --output-len 128 --batch-size 1 --num-iters-warmup 1 --num-iters 3 --compare-hf ;;
        gemma-2-9b-latency)
            bench gemma-2-9b_latency 4 latency --model dummy:gemma-2-9b --dtype bfloat16 --max-model-len 4096 \
                --input-len 32 --output-len 128 --batch-size 1 --num-iters-warmup 2 --num-iters 3 --compare-hf ;;
        *)
            model=(--model dummy:$part --dtype bfloat16 --max-model-len 4096)
            bench "${part}_throughput" 4 throughput "${model[@]}" --num-prompts 256 --input-len 256 --output-len 256 \
                --ignore-eos --batch-size 64 --compare-hf
            bench "${part}_latency" 4 latency "${model[@]}" --input-len 32 --output-len 128 --batch-size 1 \
                --num-iters-warmup 2 --num-iters 3 --compare-hf ;;
    esac
done

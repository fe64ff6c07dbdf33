#!/usr/bin/env bash
# LoRA (issue 17) on one H200 (the device tool's nvidia-h200), in one call.
# Usage: benchmarks/h200_lora.sh tests|kernels|bench ...
# `tests`: the GPU-only LoRA tests (transformers + PEFT's tokens under CUDA graphs, the kernels at
# Llama sizes, expert adapters on Mixtral). `kernels`: the batch-1 path of one projection of each of
# Llama 3.1 8B's four wrapped shapes (stacked GEMM + per-token expand, several BLOCK_N) against the
# base GEMM. `bench`: the issue's figures, `python -m engine.bench lora` (base and 8 adapters, 1000 x
# 256/256 and batch 1, in one process).
source "$(dirname "$0")/h200_common.sh"
for part in "$@"; do
    case $part in
        tests) python3 -m pytest -q -m gpu tests/engine/test_lora.py tests/kernels/test_lora_expand.py \
                   tests/kernels/test_lora_shrink.py tests/kernels/test_lora_mapping.py \
                   -p no:cacheprovider 2>&1 | tail -8 ;;
        kernels)
            for shape in "3 4096 2048" "1 4096 4096" "2 4096 14336" "1 14336 4096"; do  # slices, in, out per slice
                read -r slices in_features out_features <<<"$shape"
                python3 -m engine.bench.lora_kernels --one-token --num-slices "$slices" \
                    --in-features "$in_features" --out-features "$out_features" --iters 200
            done ;;
        bench) bench lora 12 lora --model dummy:llama-3.1-8b --dtype bfloat16 --max-model-len 4096 \
                   --num-loras 8 --lora-rank 16 ;;
    esac
done

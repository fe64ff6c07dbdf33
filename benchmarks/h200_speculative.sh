#!/usr/bin/env bash
# Draft-model speculation on one H200 (the device tool's nvidia-h200), issue 18: the GPU tests, then
# dummy:llama-3.2-1b drafting for itself (acceptance 1.0 in exact arithmetic) in float32 and in bf16,
# each against plain decoding in the same process. float32 separates a logic fault (tokens differ in
# any dtype) from rounding (bf16 only: the verification's prefill kernel against the decode kernel).
# Usage: benchmarks/h200_speculative.sh [tests] [float32] [bfloat16] [8b]
source "$(dirname "$0")/h200_common.sh"
common=(--tokenizer .gpu/tokenizer --max-model-len 2048 --max-num-seqs 16 --num-speculative-tokens 4
        --num-single 2 --batch-size 8 --max-tokens 128)
parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(tests float32 bfloat16)
for part in "${parts[@]}"; do
    case $part in
        tests) python3 -m pytest -q -m gpu tests/engine/test_cuda_spec_decode.py -p no:cacheprovider 2>&1 | tail -8 ;;
        float32|bfloat16) bench "self_draft_1b_$part" 12 speculative --model dummy:llama-3.2-1b --draft-model dummy:llama-3.2-1b \
            --dtype "$part" "${common[@]}" ;;
        8b) bench self_draft_8b_float32 12 speculative --model dummy:llama-3.1-8b --draft-model dummy:llama-3.1-8b --dtype float32 \
            "${common[@]}" ;;
    esac
done

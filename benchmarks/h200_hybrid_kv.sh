#!/usr/bin/env bash
# The hybrid KV cache manager (issue 19) on one H200 (the device tool's nvidia-h200): Gemma 2/3 with
# contexts longer than their windows, the same requests with the hybrid manager and without it
# (`--disable-hybrid-kv-cache-manager`: one group, every layer keeps every block), in one call.
# Usage: benchmarks/h200_hybrid_kv.sh tests|tests-quick|gemma-3-12b|gemma-3-12b-decode|gemma-2-9b ...
# `tests` runs the GPU-only tests of Gemma, sliding windows, CUDA graphs, the bundled model, speculative
# decoding and the kernels; `tests-quick` the first three.
source "$(dirname "$0")/h200_common.sh"
for part in "$@"; do
    case $part in
        tests) python3 -m pytest -q -m gpu tests/engine/test_cuda_gemma.py tests/engine/test_cuda_sliding_window.py \
                   tests/engine/test_cuda_graphs.py tests/engine/test_cuda.py tests/engine/test_cuda_spec_decode.py \
                   tests/kernels -p no:cacheprovider 2>&1 | tail -15 ;;
        tests-quick) python3 -m pytest -q -m gpu tests/engine/test_cuda_gemma.py \
                         tests/engine/test_cuda_sliding_window.py tests/engine/test_cuda_graphs.py \
                         -p no:cacheprovider 2>&1 | tail -5 ;;
        gemma-3-12b|gemma-2-9b|gemma-3-12b-decode)
            # Prompt-heavy: 7,680-token prompts, past Gemma 3's 1,024-token window and Gemma 2's 4,096-token
            # one. Decode-heavy: 4,096 in, 512 out, where more sequences at once mean more tokens per step.
            name=${part%-decode}
            model=(--model dummy:$name --dtype bfloat16 --max-model-len 8192)
            case $part in
                gemma-3-12b) load=(--num-prompts 128 --input-len 7680 --output-len 256) ;;
                gemma-2-9b) load=(--num-prompts 64 --input-len 7680 --output-len 256) ;;
                gemma-3-12b-decode) load=(--num-prompts 192 --input-len 4096 --output-len 512) ;;
            esac
            for mode in hybrid one-group; do
                flag=$([ $mode = one-group ] && echo --disable-hybrid-kv-cache-manager || true)
                bench "${part}_${mode}" 1 throughput "${model[@]}" $flag "${load[@]}" --ignore-eos
                grep -h "engine ready" "$OUT/${part}_${mode}.log" | tail -1
            done ;;
    esac
done

#!/usr/bin/env bash
# The engine-limit figures (issue 16) on one H200 (the device tool's nvidia-h200), new defaults
# (async scheduling, max_num_seqs 1024, max_num_batched_tokens 16384) against the previous
# configuration (no async scheduling, 256 sequences, 8192 tokens) in the same call.
# Usage: benchmarks/h200_engine_limit.sh tests|uniform|mixed|latency|profile|kinds|ops|structured|baseline|kernels ...
# (each part takes minutes); ONLY_NEW=1 skips the previous configuration. `structured` (issue 20) runs 1000 requests free and
# with half of them under a JSON schema; it needs .gpu/tokenizer (grammars compile against a tokenizer) and
# the llguidance wheel installed from .whl (see benchmarks/h200_serving.sh). `baseline` runs the batch-1
# latency of another commit in the same call, from a copy of its tree in $BASELINE_TREE (carried to the
# device: `mkdir .clean && git archive COMMIT | tar -x -C .clean`), then this tree's again, and the
# baseline's batch-1 kernel profile (compare with `profile`'s last part: which launches went, what each costs).
# `kinds` profiles the whole of the uniform and the mixed runs and splits the device time into linear layers
# (with their achieved TFLOP/s), attention and the rest: what engine.bench.step_cost_model cannot tell apart.
# `ops` times a layer's ops alone at 256-16,384 tokens (cuBLAS TFLOP/s per projection, the elementwise TB/s).
set -uo pipefail
OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
model=(--model dummy:llama-3.1-8b --dtype bfloat16 --max-model-len 4096)
previous=(--no-async-scheduling --max-num-seqs 256 --max-num-batched-tokens 8192)
bench() {  # name, then the bench arguments
    local name=$1
    shift
    if [[ $name == *_previous && -n "${ONLY_NEW:-}" ]]; then return; fi
    echo "== $name: python -m engine.bench $*"
    python3 -m engine.bench "$@" --json "$OUT/$name.json" 2>&1 | grep -v "^INFO" | tail -3
}
for part in "$@"; do
    case $part in
        structured)
            free=(throughput "${model[@]}" --tokenizer .gpu/tokenizer --num-prompts 1000 --input-len 256 --output-len 256
                  --ignore-eos)
            bench structured_free "${free[@]}"
            bench structured_half "${free[@]}" --structured-fraction 0.5 ;;
        tests) python3 -m pytest -q -m gpu tests/engine tests/kernels -p no:cacheprovider 2>&1 | tail -15 ;;
        uniform)
            bench uniform_new throughput "${model[@]}" --num-prompts 1000 --input-len 256 --output-len 256 --ignore-eos
            bench uniform_previous throughput "${model[@]}" --num-prompts 1000 --input-len 256 --output-len 256 \
                --ignore-eos "${previous[@]}" ;;
        mixed)
            bench mixed_new throughput "${model[@]}" --num-prompts 1000 --input-len 16-1024 --output-len 16-512 --ignore-eos
            bench mixed_previous throughput "${model[@]}" --num-prompts 1000 --input-len 16-1024 --output-len 16-512 \
                --ignore-eos "${previous[@]}" ;;
        latency)
            bench latency_new latency "${model[@]}" --input-len 32 --output-len 128 --batch-size 1 \
                --num-iters-warmup 3 --num-iters 5
            bench latency_previous latency "${model[@]}" --input-len 32 --output-len 128 --batch-size 1 \
                --num-iters-warmup 3 --num-iters 5 --no-async-scheduling ;;
        baseline)
            one=(latency "${model[@]}" --input-len 32 --output-len 128 --batch-size 1 --num-iters-warmup 3 --num-iters 5)
            echo "== baseline_latency ($BASELINE_TREE): python -m engine.bench ${one[*]}"
            (cd "$BASELINE_TREE" && python3 -m engine.bench "${one[@]}" --json "$OUT/baseline_latency.json" 2>&1 |
                grep -v "^INFO" | tail -3)
            bench latency_after_baseline "${one[@]}"
            echo "== baseline profile batch 1, 32/128 ($BASELINE_TREE)"
            (cd "$BASELINE_TREE" && python3 -m engine.bench.step_profile "${model[@]}" --num-prompts 1 --input-len 32 \
                --output-len 128 --window 40 2>&1 | grep -v "^INFO") ;;
        kernels)  # the down projection's SiLU-gated GEMV against the activation kernel + GEMV (graph replays)
            echo "== python -m engine.bench.gemv --shapes 4096x14336"
            python3 -m engine.bench.gemv --shapes 4096x14336 --json "$OUT/gemv_down.json" 2>&1 | grep -v "^INFO" ;;
        ops)
            echo "== python -m engine.bench.layer_ops"
            python3 -m engine.bench.layer_ops --json "$OUT/layer_ops.json" 2>&1 | grep -v "^INFO" ;;
        kinds)
            for lens in "256 256" "16-1024 16-512"; do
                read -r in_len out_len <<< "$lens"
                echo "== whole-run profile 1000 x $in_len/$out_len"
                python3 -m engine.bench.step_profile "${model[@]}" --num-prompts 1000 --input-len "$in_len" \
                    --output-len "$out_len" --profile-from 0 --window 0 2>&1 | grep -v "^INFO"
            done ;;
        profile)
            for flags in "" "--no-async-scheduling"; do
                echo "== profile 1000 x 256/256 $flags"
                python3 -m engine.bench.step_profile "${model[@]}" --num-prompts 1000 --input-len 256 \
                    --output-len 256 $flags 2>&1 | grep -v "^INFO"
            done
            echo "== profile batch 1, 32/128"
            python3 -m engine.bench.step_profile "${model[@]}" --num-prompts 1 --input-len 32 --output-len 128 \
                --window 40 2>&1 | grep -v "^INFO" ;;
        *) echo "unknown part $part" >&2; exit 2 ;;
    esac
done

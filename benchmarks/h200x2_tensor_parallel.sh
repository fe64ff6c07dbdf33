#!/usr/bin/env bash
# Tensor parallelism re-measured with the step contract (the engine-limit issue) on two H200s of one
# host (the device tool's nvidia-h200-x2), in one call per part; RESULTS.md's TP=2 tables hold the
# figures from before the contract. NVLink multicast stays off (the device's KINDS.md says why).
# Usage: benchmarks/h200x2_tensor_parallel.sh tests|8b|70b ...
# `tests`: the NCCL tests (greedy tokens at TP=2 equal one GPU's; a killed worker takes the engine
# down); the contract's own tests (gloo, block-table writes counted) run in CI. `8b` and `70b`: the
# commands of RESULTS.md's earlier TP=2 rows, unchanged, so the figures compare (70B: minutes each;
# loading it and capturing its graphs alone took 40-70 s).
source "$(dirname "$0")/h200_common.sh"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -c 'import torch; print("GPUs:", torch.cuda.device_count())'
for part in "$@"; do
    case $part in
        tests) python3 -m pytest -q -m gpu tests/engine/test_cuda_tensor_parallel.py -p no:cacheprovider 2>&1 | tail -6 ;;
        8b)
            model=(--model dummy:llama-3.1-8b --dtype bfloat16 --max-model-len 4096 --tensor-parallel-size 2)
            bench tp2_8b_throughput 4 throughput "${model[@]}" --num-prompts 1000 --input-len 256 --output-len 256 \
                --ignore-eos
            bench tp2_8b_latency 4 latency "${model[@]}" --input-len 32 --output-len 128 --batch-size 1 \
                --num-iters-warmup 3 --num-iters 5 ;;
        70b)
            model=(--model dummy:llama-3.1-70b --dtype bfloat16 --tensor-parallel-size 2)
            bench tp2_70b_throughput 4 throughput "${model[@]}"
            bench tp2_70b_latency 4 latency "${model[@]}" ;;
        *) echo "unknown part $part" >&2; exit 2 ;;
    esac
done

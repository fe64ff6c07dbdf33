# Sourced by the h200_*.sh scripts: $OUT for what comes back from the device, the checkout on
# PYTHONPATH, the card named in the log, and `bench NAME LINES ARGS...`, which runs
# `python -m engine.bench ARGS... --json $OUT/NAME.json`, keeps its whole log in $OUT/NAME.log (engine
# load and graph capture times are INFO lines: a run cut short by a time limit still says where its
# time went) and prints the last LINES lines that are not INFO.
set -uo pipefail
OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
bench() {
    local name=$1 lines=$2
    shift 2
    echo "== $name: python -m engine.bench $*"
    python3 -m engine.bench "$@" --json "$OUT/$name.json" >"$OUT/$name.log" 2>&1
    grep -v "^INFO" "$OUT/$name.log" | tail -"$lines"
}

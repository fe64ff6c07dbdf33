"""How the kernel micro-benchmarks report: a JSON line per result, and all of them with the run's
arguments in `--json PATH` when given."""

from __future__ import annotations

import argparse
import json


def report(results: list[dict], args: argparse.Namespace) -> int:
    for row in results:
        print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "results": results}, f, indent=2)
    return 0

"""The per-token text costs of the serving path, each against its previous form in the same run (CPU).

    python benchmarks/cpu_text_costs.py [--baseline-commit 7fc719d]

- a stream's detokenizing with a tokenizer that sets `clean_up_tokenization_spaces` (Llama 3's does;
  transformers 5 ignores it for BPE): the window path it took before against DecodeStream now;
- a logprob's token text: transformers' decode([id]) before against the Rust backend now;
- a web process decoding one reply-stream entry: protocol.py as of the baseline commit against now.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.tokenization import IncrementalDetokenizer, load_tokenizer, token_text  # noqa: E402
from engine.weights.source import ModelSource, bundled_model_path  # noqa: E402


def us_per(fn, count: int) -> float:
    started = time.perf_counter()
    fn()
    return (time.perf_counter() - started) / count * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline-commit", default="7fc719d")
    args = parser.parse_args()
    tokenizer = copy.deepcopy(load_tokenizer(ModelSource("gguf", path=bundled_model_path())))  # SmolLM2's BPE
    tokenizer.clean_up_tokenization_spaces = True
    ids = [random.Random(0).randrange(1000, 40000) for _ in range(2000)]

    def stream(window: bool):
        detokenizer = IncrementalDetokenizer(tokenizer, [1, 2, 3])
        if window:
            detokenizer._stream = detokenizer._backend = None  # the path such a tokenizer took before
        return lambda: [detokenizer.step([i]) for i in ids]

    print(f"stream, clean-up tokenizer: window path {us_per(stream(True), len(ids)):.2f} us a token, "
          f"DecodeStream {us_per(stream(False), len(ids)):.2f}")
    print(f"logprob token text: decode([id]) {us_per(lambda: [tokenizer.decode([i]) for i in ids], len(ids)):.2f}"
          f" us, backend {us_per(lambda: [token_text(tokenizer, i) for i in ids], len(ids)):.2f}")

    old_source = subprocess.run(["git", "show", f"{args.baseline_commit}:engine/service/protocol.py"], cwd=ROOT,
                                capture_output=True, text=True, check=True).stdout
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "old_protocol.py"
        path.write_text(old_source)
        spec = importlib.util.spec_from_file_location("old_protocol", path)
        old = sys.modules["old_protocol"] = importlib.util.module_from_spec(spec)  # dataclasses look it up
        spec.loader.exec_module(old)
    from engine.service import protocol as new
    for name, module in (("baseline", old), ("now", new)):
        deltas = [module.OutputDelta(f"cmpl-{i}", 5, [module.CompletionDelta(0, " hi", [12, 34], None, None, None)],
                                     False, module.Usage(256, 10, 0), replica_id="r1") for i in range(125)]
        data = module.encode_deltas(deltas)
        seconds = us_per(lambda: [module.decode_deltas(data) for _ in range(200)], 200 * 125)
        print(f"decode a delta, protocol.py {name}: {seconds:.2f} us")


if __name__ == "__main__":
    main()

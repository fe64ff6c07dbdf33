"""python -m engine generate|bench: the engine from the command line.

`generate` runs prompts through the offline API; `bench` is `python -m engine.bench`.
"""

from __future__ import annotations

import argparse
import sys

from engine.config import BUNDLED_MODEL


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        from engine.bench.__main__ import main as bench_main

        return bench_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m engine", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("bench", help="benchmarks (see python -m engine bench --help)", add_help=False)
    gen = sub.add_parser("generate", help="generate text for prompts")
    gen.add_argument("prompts", nargs="+", help="prompt texts")
    gen.add_argument("--model", default=BUNDLED_MODEL)
    gen.add_argument("--chat", action="store_true", help="wrap each prompt as a user message (chat template)")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.7)
    gen.add_argument("--top-p", type=float, default=0.9)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--dtype", default="auto")
    gen.add_argument("--device", default="auto")
    args = parser.parse_args(argv)

    from engine import LLM, SamplingParams

    llm = LLM(model=args.model, dtype=args.dtype, device=args.device)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
                            seed=args.seed)
    if args.chat:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in args.prompts], params)
    else:
        outputs = llm.generate(args.prompts, params)
    for prompt, output in zip(args.prompts, outputs):
        print(f"=== {prompt}\n{output.outputs[0].text.strip()}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The bundled SmolLM2-135M with LoRA, outside the Django test process (which stays free of torch):

python -m tests.django.inference.smollm2_lora make OUT_DIR --seed N
    a random PEFT adapter with SmolLM2's shapes, made with the `peft` package (B not zero, so the
    adapter changes the model's output);
python -m tests.django.inference.smollm2_lora generate --adapter PATH --prompt TEXT --max-tokens N
    the offline engine's greedy completion under that adapter (the model's other sampling defaults,
    as the API applies them), as JSON {"text": ...} on the last line.
"""
from __future__ import annotations

import argparse
import json

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 8, 16


def make(folder: str, seed: int) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from engine.weights.dummy import PRESETS

    torch.manual_seed(seed)
    _, shape = PRESETS["smollm2-135m"]
    model = LlamaForCausalLM(LlamaConfig(**{**shape, "vocab_size": 16}))  # LoRA leaves the embeddings alone
    peft_model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS,
                                                  lora_dropout=0.0, init_lora_weights=False))
    peft_model.save_pretrained(folder)


def generate(adapter: str, prompt: str, max_tokens: int) -> dict:
    from engine import LLM, SamplingParams
    from engine.config import BUNDLED_MODEL
    from engine.lora.request import LoRARequest

    llm = LLM(model=BUNDLED_MODEL, dtype="float32", enable_lora=True, max_lora_rank=16, max_num_seqs=4,
              kv_cache_memory_bytes=100_000_000)
    params = SamplingParams(**{**llm.llm_engine.sampling_defaults, "temperature": 0.0, "max_tokens": max_tokens})
    output = llm.generate([prompt], params, lora_request=LoRARequest("reference", 1, adapter), use_tqdm=False)[0]
    return {"text": output.outputs[0].text}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    make_parser = commands.add_parser("make")
    make_parser.add_argument("folder")
    make_parser.add_argument("--seed", type=int, default=0)
    generate_parser = commands.add_parser("generate")
    generate_parser.add_argument("--adapter", required=True)
    generate_parser.add_argument("--prompt", required=True)
    generate_parser.add_argument("--max-tokens", type=int, default=8)
    args = parser.parse_args()
    if args.command == "make":
        make(args.folder, args.seed)
    else:
        print(json.dumps(generate(args.adapter, args.prompt, args.max_tokens)))


if __name__ == "__main__":
    main()

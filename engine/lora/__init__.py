"""Multi-adapter LoRA (vLLM's API and names): many PEFT adapters on one base model, chosen per request."""

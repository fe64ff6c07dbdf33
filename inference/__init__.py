"""Inference: the OpenAI-compatible API, streaming and batch jobs, in front of the engine."""

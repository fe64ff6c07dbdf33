"""Tensor parallelism: one process per rank, torch.distributed collectives (gloo on CPU, NCCL on CUDA)."""

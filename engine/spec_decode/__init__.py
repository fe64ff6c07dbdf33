"""Speculative decoding: cheap proposals of the next k tokens, verified by one target forward."""

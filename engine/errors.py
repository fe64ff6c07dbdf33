"""Errors the engine raises that callers must tell apart from a failed request."""


class EngineDeadError(RuntimeError):
    """The engine can run no more steps (a tensor-parallel worker died): whatever it holds is lost,
    and only a new engine, in a new process on NCCL, can serve again."""

"""How many n-gram proposals a request's next step carries: as many as its last verification
confirmed, plus one, growing back (doubling) while every proposal is confirmed.

Why: a verification runs every proposal through the target, so a rejected proposal costs a row of
every GEMM. At batch 1 that row is nearly free (the step reads the weights either way), but a batch
of 16 requests with 4 proposals each is 80 rows, where a CPU's GEMMs are bound by arithmetic: there
the rejected proposals of requests that are not copying at the moment (most n-gram matches of one
token) cost as much as the accepted ones gain. Acceptance comes in runs (a copied span is
confirmed to its end, then nothing matches for a while), so the last verification predicts the next
one; the probe of one proposal keeps a request ready to speculate again, and doubling reaches the
full length in two steps once it copies. Outputs do not depend on it: the target verifies whatever
is proposed.
"""

from __future__ import annotations


def next_speculation_length(proposed: int, accepted: int, maximum: int) -> int:
    """Proposals for the next step, after a step that verified `proposed` (> 0) and confirmed `accepted`."""
    if accepted >= proposed:
        return min(maximum, 2 * proposed)
    return min(maximum, accepted + 1)

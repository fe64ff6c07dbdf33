"""Rejection sampling of one request's sampled draft tokens (Leviathan et al., 2023; Chen et al., 2023).

The draft drew proposal j from its own distribution q_j; the target's distribution there is p_j.
Proposal j is accepted with probability min(1, p_j(x) / q_j(x)); the first rejected one is replaced
by a draw from norm(max(0, p_j - q_j)); when all are accepted, one more token is drawn from the
target's distribution after them. Each kept token then follows the target's distribution exactly,
whatever q is, and the closer q is to p, the more are accepted.

Row j of the result is the proposal when accepted, else its replacement, which is never the proposal
(a rejected x has p_j(x) < q_j(x), so the residual has no mass there); the row after the proposals is
the extra token. So "keep tokens up to the first that differs from its proposal" (the runner's
verification, shared with deterministic proposals) reads them right.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def rejection_sample(target_probs: torch.Tensor, draft_token_ids: torch.Tensor, draft_probs: torch.Tensor,
                     uniform: torch.Tensor, sample: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """target_probs: [k + 1, vocab] (p after each proposal's prefix, and after all of them);
    draft_token_ids: [k]; draft_probs: [k, vocab] (the q each proposal was drawn from);
    uniform: [k] draws from U[0, 1); sample: rows of (unnormalised) probabilities -> one token each.
    Returns the k + 1 tokens described above."""
    k = draft_token_ids.shape[0]
    rows = torch.arange(k, device=target_probs.device)
    p, q = target_probs[:k], draft_probs
    accepted = uniform * q[rows, draft_token_ids] < p[rows, draft_token_ids]
    residual = (p - q).clamp_(min=0)
    # Where p and q agree (to rounding) every proposal is accepted; p keeps the unused row well defined.
    residual = torch.where(residual.sum(dim=-1, keepdim=True) > 0, residual, p)
    replacements = sample(torch.cat([residual, target_probs[k:]]))
    return torch.where(torch.cat([accepted, accepted.new_zeros(1)]),
                       torch.cat([draft_token_ids, draft_token_ids.new_zeros(1)]), replacements)

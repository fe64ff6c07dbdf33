"""A replica started with `--speculative-config` speculates, and says so in its heartbeat (the
counters /metrics exports): a copy-heavy request through Redis gives the plain replica's tokens.
With n-gram prompt lookup, and with a draft model (the bundled model as its own draft: every greedy
proposal is accepted)."""

from __future__ import annotations

import asyncio
import json

import pytest

from engine.config import BUNDLED_MODEL
from tests.engine.test_spec_decode import PROMPTS

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1}
SELF_DRAFT = {"model": BUNDLED_MODEL, "num_speculative_tokens": 3}


@pytest.mark.parametrize("speculative_config", [NGRAM, SELF_DRAFT], ids=["ngram", "draft-model"])
def test_a_speculating_replica_reports_its_acceptance(service, speculative_config):
    replica = service.start_replica("spec", "--speculative-config", json.dumps(speculative_config))
    request = service.request(PROMPTS[0], max_tokens=40)

    async def main():
        async with service.client() as client:
            return await service.run(client, request)

    deltas = asyncio.run(main())
    service.assert_completed(deltas)
    beat = service.wait_until(lambda: (hb := replica.heartbeat()) and hb.spec_num_steps > 0 and hb, 30,
                              "a heartbeat with speculation counters")
    assert 0 < beat.spec_num_accepted_tokens <= beat.spec_num_draft_tokens
    if "model" in speculative_config:
        assert beat.spec_num_accepted_tokens == beat.spec_num_draft_tokens
    assert "lazy dog" in service.text_of(deltas)

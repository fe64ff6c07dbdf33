"""A replica shares its slots fairly between tenants (issue 15, finding 5): a tenant's late 4-token
call finishes while another tenant's n=16 call is still far from done. Real Redis, a real replica
of the bundled model, the real client; the tenant travels in EngineRequest.tenant."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest

pytestmark = pytest.mark.timeout(400)


@pytest.fixture(scope="module")
def svc(module_service):
    module_service.start_replica("r", "--max-num-seqs", "4")
    return module_service


def test_a_late_small_call_finishes_while_another_tenants_flood_runs(svc):
    """16 sequences of 16 tokens, 4 at a time: 4 rounds of 16 steps. The small call waits for the
    first free slot (about one round), not for all 16 sequences (4 rounds)."""
    flood = dataclasses.replace(svc.request("Write a story.", n=16, max_tokens=16, ignore_eos=True), tenant="flood")
    small = dataclasses.replace(svc.request("Hi", max_tokens=4, ignore_eos=True), tenant="small")

    async def main():
        async with svc.client() as client:
            flood_stream = await client.submit(flood)
            flood_tokens: list[tuple[float, int]] = []  # (when, how many) per delta

            async def read_flood():
                async for delta in flood_stream:
                    flood_tokens.append((time.monotonic(), sum(len(output.token_ids) for output in delta.outputs)))

            flood_run = asyncio.create_task(read_flood())
            while not sum(n for _, n in flood_tokens):  # the flood is decoding
                assert not flood_run.done(), flood_run
                await asyncio.sleep(0.05)
            small_deltas = await svc.run(client, small, timeout=300)
            small_done = time.monotonic()
            await asyncio.wait_for(flood_run, 300)
            return small_deltas, flood_tokens, small_done

    small_deltas, flood_tokens, small_done = asyncio.run(main())
    svc.assert_completed(small_deltas, max_tokens=4)
    assert sum(n for _, n in flood_tokens) == 16 * 16
    before_small = sum(n for when, n in flood_tokens if when < small_done)
    assert before_small < 16 * 16 // 2, f"the small call waited for {before_small} of the flood's {16 * 16} tokens"

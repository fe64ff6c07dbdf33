"""The Sampler on hand-made logits over an 8-token vocabulary.

The filtered distributions are computed here independently (plain Python math) and compared with
the sampler's empirical frequencies by a chi-square statistic. The sampler is seeded, so every
run draws the same numbers: the statistical tests are deterministic.
"""

import math

import pytest
import torch

from engine.layers.sampler import Sampler
from engine.request import Request
from engine.sampling_params import SamplingParams

LOGITS = [0.2, 2.0, -1.0, 1.1, -2.0, 1.5, 0.7, -0.3]  # no ties; sorted order is a permutation
VOCAB = len(LOGITS)
# Upper 1e-4 quantiles of the chi-square distribution, by degrees of freedom.
CHI2_CRITICAL = {1: 15.14, 2: 18.42, 3: 21.11, 4: 23.51, 5: 25.74, 6: 27.86, 7: 29.88}


def make_request(request_id="r", prompt=(0,), outputs=(), index=0, **params) -> Request:
    request = Request(request_id, list(prompt), SamplingParams(**params), index=index)
    for token in outputs:
        request.append_output_token(token)
    return request


def logits_rows(rows, values=LOGITS):
    return torch.tensor([values] * rows, dtype=torch.float32)


def expected_distribution(logits, temperature, top_k=0, top_p=1.0, min_p=0.0) -> dict[int, float]:
    """Temperature, then top-k, then top-p over the top-k distribution renormalised, then min-p
    (relative to the most likely token); the survivors renormalised."""
    scaled = [value / temperature for value in logits]
    order = sorted(range(len(scaled)), key=lambda i: -scaled[i])
    weights = [math.exp(value) for value in scaled]
    total = sum(weights)
    probs = [w / total for w in weights]
    candidates = order[:top_k] if top_k else order
    candidate_mass = sum(probs[i] for i in candidates)
    kept, mass_before = [], 0.0
    for i in candidates:
        if mass_before < top_p:
            kept.append(i)
        mass_before += probs[i] / candidate_mass
    kept = [i for i in kept if probs[i] >= min_p * probs[order[0]]]
    kept_mass = sum(probs[i] for i in kept)
    return {i: probs[i] / kept_mass for i in kept}


def chi_square(counts: dict[int, int], expected: dict[int, float], draws: int) -> tuple[float, int]:
    """Pearson's statistic; bins expecting fewer than 5 draws are pooled into one."""
    observed, expect, pooled_obs, pooled_exp = [], [], 0, 0.0
    for token, p in expected.items():
        if p * draws < 5:
            pooled_obs += counts.get(token, 0)
            pooled_exp += p * draws
        else:
            observed.append(counts.get(token, 0))
            expect.append(p * draws)
    if pooled_exp:
        observed.append(pooled_obs)
        expect.append(pooled_exp)
    statistic = sum((o - e) ** 2 / e for o, e in zip(observed, expect))
    return statistic, len(observed) - 1


def draw(sampler, params: dict, calls=10, rows=2000) -> list[int]:
    tokens = []
    for call in range(calls):
        requests = [make_request(f"c{call}-{row}", **params) for row in range(rows)]
        tokens += sampler(logits_rows(rows), requests).token_ids
    return tokens


# -- greedy ----------------------------------------------------------------------------------------


def test_greedy_is_argmax():
    sampler = Sampler(seed=0, device=torch.device("cpu"))
    logits = torch.randn(16, 50, generator=torch.Generator().manual_seed(1))
    requests = [make_request(f"g{i}", temperature=0.0) for i in range(16)]
    assert sampler(logits, requests).token_ids == logits.argmax(dim=-1).tolist()


def test_greedy_rows_stay_argmax_in_a_mixed_batch():
    sampler = Sampler(seed=0, device=torch.device("cpu"))
    requests = [make_request(f"m{i}", temperature=0.0 if i % 2 == 0 else 1.0) for i in range(400)]
    tokens = sampler(logits_rows(400), requests).token_ids
    assert all(tokens[i] == 1 for i in range(0, 400, 2))
    assert len(set(tokens[1::2])) > 3, "the random rows should spread over the vocabulary"


# -- the sampled distribution ----------------------------------------------------------------------

CASES = {
    "temperature-1": dict(temperature=1.0),
    "temperature-0.5": dict(temperature=0.5),
    "top-k": dict(temperature=1.5, top_k=3),
    "top-p": dict(temperature=1.0, top_p=0.7),
    "min-p": dict(temperature=0.8, min_p=0.15),
    "all-filters": dict(temperature=1.2, top_k=6, top_p=0.9, min_p=0.05),
}


@pytest.mark.parametrize("case", CASES)
def test_sampling_matches_the_filtered_distribution(case):
    params = CASES[case]
    expected = expected_distribution(LOGITS, params["temperature"], params.get("top_k", 0),
                                     params.get("top_p", 1.0), params.get("min_p", 0.0))
    sampler = Sampler(seed=1234, device=torch.device("cpu"))
    tokens = draw(sampler, params)
    counts = {t: tokens.count(t) for t in set(tokens)}
    outside = set(counts) - set(expected)
    assert not outside, f"tokens {outside} lie outside the filtered set {sorted(expected)}"
    statistic, dof = chi_square(counts, expected, len(tokens))
    assert statistic < CHI2_CRITICAL[dof], (
        f"chi-square {statistic:.1f} with {dof} dof; observed "
        f"{ {t: counts.get(t, 0) / len(tokens) for t in expected} } expected {expected}")


def test_the_chi_square_check_would_notice_a_wrong_temperature():
    """Guard on the test itself: draws at temperature 1.0 fail against the 0.8 distribution."""
    sampler = Sampler(seed=1234, device=torch.device("cpu"))
    tokens = draw(sampler, dict(temperature=1.0))
    counts = {t: tokens.count(t) for t in set(tokens)}
    statistic, dof = chi_square(counts, expected_distribution(LOGITS, 0.8), len(tokens))
    assert statistic > CHI2_CRITICAL[dof]


def test_tiny_top_p_keeps_only_the_most_likely_token():
    sampler = Sampler(seed=0, device=torch.device("cpu"))
    assert set(draw(sampler, dict(temperature=2.0, top_p=0.01), calls=1, rows=500)) == {1}
    assert set(draw(sampler, dict(temperature=2.0, top_k=1), calls=1, rows=500)) == {1}


def test_rows_with_different_filters_in_one_batch():
    sampler = Sampler(seed=7, device=torch.device("cpu"))
    settings = [dict(temperature=1.0, top_k=2), dict(temperature=1.0, top_p=0.7), dict(temperature=0.0),
                dict(temperature=1.0)]
    requests = [make_request(f"b{i}", **settings[i % 4]) for i in range(4000)]
    tokens = sampler(logits_rows(4000), requests).token_ids
    assert set(tokens[0::4]) == {1, 5}
    assert set(tokens[1::4]) == {1, 5, 3}
    assert set(tokens[2::4]) == {1}
    assert set(tokens[3::4]) == set(range(VOCAB))


# -- seeds -----------------------------------------------------------------------------------------


def run_steps(sampler, batch_builder, steps=20):
    """Sample `steps` times; batch_builder(step) -> (logits, requests, row_of_interest)."""
    tokens = []
    for step in range(steps):
        logits, requests, row = batch_builder(step)
        tokens.append(sampler(logits, requests).token_ids[row])
    return tokens


def test_seeded_request_reproduces_and_ignores_its_batch_companions():
    logits = torch.tensor(LOGITS)
    seeded = make_request("seeded", seed=42, temperature=1.0)

    def alone(step):
        return logits[None, :], [seeded], 0

    def crowded(step):  # different companions every step, the seeded row moving around
        companions = [make_request(f"x{step}-{i}", temperature=1.0, seed=None if i % 2 else 99 + i)
                      for i in range(step % 5 + 1)]
        row = step % (len(companions) + 1)
        batch = companions[:row] + [seeded] + companions[row:]
        rows = torch.randn(len(batch), VOCAB)
        rows[row] = logits
        return rows, batch, row

    first = run_steps(Sampler(seed=0, device=torch.device("cpu")), alone)
    again = run_steps(Sampler(seed=555, device=torch.device("cpu")), alone)
    in_batch = run_steps(Sampler(seed=3, device=torch.device("cpu")), crowded)
    assert first == again == in_batch
    assert len(set(first)) > 1, "20 draws at temperature 1 should not all be one token"


def test_different_seeds_and_children_draw_differently():
    logits = torch.tensor(LOGITS)[None, :]

    def tokens_of(request):
        sampler = Sampler(seed=0, device=torch.device("cpu"))
        return [sampler(logits, [request]).token_ids[0] for _ in range(30)]

    assert tokens_of(make_request("a", seed=1)) != tokens_of(make_request("a", seed=2))
    # The n > 1 children of one seeded request must not all draw the same sequence.
    assert tokens_of(make_request("p#0", seed=1, index=0)) != tokens_of(make_request("p#1", seed=1, index=1))


def test_unseeded_sampling_follows_the_engine_seed():
    def tokens(seed):
        sampler = Sampler(seed=seed, device=torch.device("cpu"))
        return sampler(logits_rows(200), [make_request(f"u{i}") for i in range(200)]).token_ids

    assert tokens(5) == tokens(5)
    assert tokens(5) != tokens(6)


# -- penalties -------------------------------------------------------------------------------------


def penalized(request, logits):
    logits = logits.clone()[None, :]
    Sampler(seed=0, device=torch.device("cpu"))._apply_penalties(logits, [request])
    return logits[0]


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens():
    logits = torch.tensor([1.5, -1.0, 2.0, -0.5, 0.8, 0.0, 3.0, -2.0])
    request = make_request(prompt=[0, 1], outputs=[2, 3, 2], repetition_penalty=2.0)
    expected = logits.clone()
    expected[0], expected[2] = 1.5 / 2, 2.0 / 2  # seen, positive (prompt and output tokens alike)
    expected[1], expected[3] = -1.0 * 2, -0.5 * 2  # seen, negative
    assert torch.allclose(penalized(request, logits), expected)


def test_frequency_and_presence_penalties_count_output_tokens_only():
    logits = torch.tensor([1.5, -1.0, 2.0, -0.5, 0.8, 0.0, 3.0, -2.0])
    request = make_request(prompt=[0, 1, 4], outputs=[2, 3, 2, 2], frequency_penalty=0.5, presence_penalty=0.25)
    expected = logits.clone()
    expected[2] -= 0.5 * 3 + 0.25
    expected[3] -= 0.5 * 1 + 0.25
    assert torch.allclose(penalized(request, logits), expected)


def test_negative_penalties_encourage_repetition():
    logits = torch.zeros(VOCAB)
    request = make_request(prompt=[0], outputs=[5, 5], frequency_penalty=-1.0, presence_penalty=-0.5)
    assert penalized(request, logits)[5].item() == pytest.approx(2.5)


def test_penalties_change_the_greedy_choice():
    sampler = Sampler(seed=0, device=torch.device("cpu"))
    logits = torch.tensor([[0.0, 2.0, 1.9, 0, 0, 0, 0, 0]] * 3)
    plain = make_request("plain", outputs=[1], temperature=0.0)
    repeated = make_request("rep", outputs=[1], temperature=0.0, repetition_penalty=1.2)
    present = make_request("pres", outputs=[1], temperature=0.0, presence_penalty=0.2)
    assert sampler(logits, [plain, repeated, present]).token_ids == [1, 2, 2]


# -- min_tokens ------------------------------------------------------------------------------------


def test_min_tokens_masks_eos_and_stop_token_ids():
    sampler = Sampler(seed=0, device=torch.device("cpu"))
    logits = torch.tensor([[0.0, 0.5, 0.0, 0.0, 0.0, 0.0, 4.0, 5.0]])  # 7 = EOS, 6 = a stop id
    request = make_request(temperature=0.0, min_tokens=2, stop_token_ids=[6])
    request.sampling_params.all_stop_token_ids = {7}
    assert sampler(logits.clone(), [request]).token_ids == [1]
    request.append_output_token(1)
    assert sampler(logits.clone(), [request]).token_ids == [1]
    request.append_output_token(1)  # min_tokens reached: EOS may come now
    assert sampler(logits.clone(), [request]).token_ids == [7]


def test_min_tokens_with_ignore_eos_masks_only_stop_token_ids():
    sampler = Sampler(seed=0, device=torch.device("cpu"))
    logits = torch.tensor([[0.0, 0.5, 0.0, 0.0, 0.0, 0.0, 5.0, 4.0]])
    request = make_request(temperature=0.0, min_tokens=2, stop_token_ids=[6], ignore_eos=True)
    request.sampling_params.all_stop_token_ids = {7}
    assert sampler(logits, [request]).token_ids == [7]


def test_min_tokens_applies_to_random_sampling_too():
    sampler = Sampler(seed=0, device=torch.device("cpu"))
    requests = [make_request(f"s{i}", temperature=1.0, min_tokens=1, stop_token_ids=[1, 5]) for i in range(500)]
    tokens = sampler(logits_rows(500), requests).token_ids
    assert 1 not in tokens and 5 not in tokens


# -- logprobs --------------------------------------------------------------------------------------


def test_logprobs_list_the_chosen_token_first_then_the_top_k_with_ranks():
    sampler = Sampler(seed=0, device=torch.device("cpu"))
    logits = torch.tensor([LOGITS])
    reference = torch.log_softmax(logits[0], dim=-1)
    greedy = make_request("g", temperature=0.0, logprobs=3)
    output = sampler(logits, [greedy])
    entries = output.logprobs[0]
    assert entries[0] == (1, pytest.approx(reference[1].item()), 1)
    assert [e[0] for e in entries[1:]] == [1, 5, 3]
    assert [e[2] for e in entries[1:]] == [1, 2, 3]
    for token_id, logprob, _ in entries:
        assert logprob == pytest.approx(reference[token_id].item(), abs=1e-6)


def test_logprobs_of_a_sampled_unlikely_token_report_its_rank():
    sampler = Sampler(seed=0, device=torch.device("cpu"))
    logits = torch.tensor([LOGITS] * 3000)
    requests = [make_request(f"l{i}", temperature=1.0, logprobs=2) for i in range(3000)]
    output = sampler(logits, requests)
    ranks = {token: rank for token, rank in enumerate([5, 1, 7, 3, 8, 2, 4, 6])}
    seen = set()
    for token_id, entries in zip(output.token_ids, output.logprobs):
        assert entries[0][0] == token_id and entries[0][2] == ranks[token_id]
        assert len(entries) == 3
        seen.add(token_id)
    assert len(seen) == VOCAB


def test_logprobs_are_raw_before_penalties_and_temperature():
    sampler = Sampler(seed=0, device=torch.device("cpu"))
    logits = torch.tensor([LOGITS])
    raw = torch.log_softmax(logits[0], -1)
    request = make_request(outputs=[1], temperature=0.0, repetition_penalty=3.0, logprobs=0)
    entries = sampler(logits, [request]).logprobs[0]
    assert len(entries) == 1
    token_id, logprob, _ = entries[0]
    assert token_id == 5, "the penalty moved the greedy choice from token 1 to token 5"
    assert logprob == pytest.approx(raw[5].item(), abs=1e-6)


def test_no_logprobs_unless_asked():
    sampler = Sampler(seed=0, device=torch.device("cpu"))
    assert sampler(logits_rows(2), [make_request("a"), make_request("b", logprobs=1)]).logprobs[0] is None

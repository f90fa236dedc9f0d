"""The sampling plan on plain data: which samplers run, in which order, with which arguments, and the shortlist
of candidates a chain is given."""

from __future__ import annotations

import llama_cpp as ll
import numpy as np

from app.backends.llama.sampling import (
    DEFAULT_TOP_K,
    MAX_SHORTLIST,
    PENALTY_LAST_N,
    STRIDE,
    Sampling,
    build_chain,
    free_chain,
    plan,
    shortlist,
    top_candidates,
)


def test_temperature_zero_is_greedy_and_nothing_else() -> None:
    assert plan(Sampling(temperature=0, top_p=0.5, top_k=3)) == [("greedy", ())]


def test_sampled_requests_narrow_to_the_default_top_k_before_top_p() -> None:
    steps = plan(Sampling(temperature=0.7, top_p=0.95, seed=7))
    assert steps == [("top_k", (DEFAULT_TOP_K,)), ("top_p", (0.95, 1)), ("temp", (0.7,)), ("dist", (7,))]


def test_top_k_zero_turns_the_candidate_limit_off() -> None:
    steps = plan(Sampling(temperature=1.0, top_k=0, min_p=0.05))
    assert [name for name, _ in steps] == ["min_p", "temp", "dist"]
    assert steps[-1] == ("dist", (ll.LLAMA_DEFAULT_SEED,))


def test_penalties_run_first_and_seeds_fit_in_32_bits() -> None:
    steps = plan(Sampling(temperature=0.5, top_k=5, repeat_penalty=1.1, seed=-1))
    assert steps[0] == ("penalties", (PENALTY_LAST_N, 1.1, 0.0, 0.0))
    assert steps[1] == ("top_k", (5,))
    assert steps[-1] == ("dist", (0xFFFFFFFF,))
    assert plan(Sampling(temperature=0, presence_penalty=0.5))[0][0] == "penalties"
    grammar = 'root ::= "yes" | "no"'  # checked apart from the chain (LlamaModel.sample), never one of its steps
    assert [name for name, _ in plan(Sampling(temperature=0, repeat_penalty=1.1, grammar=grammar))] == [
        "penalties",
        "greedy",
    ]


def test_every_plan_builds_a_llama_cpp_chain() -> None:
    for sampling in (
        Sampling(temperature=0),
        Sampling(temperature=0.7, top_p=0.9, min_p=0.1, repeat_penalty=1.2),
        Sampling(temperature=0, logit_bias=((5, -100.0), (7, 2.5))),
    ):
        steps = plan(sampling)
        chain = build_chain(steps, 49152)
        try:
            assert ll.llama_sampler_chain_n(chain) == len(steps)
        finally:
            free_chain(chain)


def test_logit_bias_comes_first() -> None:
    steps = plan(Sampling(temperature=0.5, repeat_penalty=1.1, logit_bias=((5, -100.0), (7, 2.5))))
    assert steps[0] == ("logit_bias", (5, -100.0, 7, 2.5))
    assert steps[1][0] == "penalties"


def test_the_shortlist_is_what_the_chain_starts_by_keeping() -> None:
    assert shortlist(plan(Sampling(temperature=0))) == 1
    assert shortlist(plan(Sampling(temperature=0.7, top_p=0.95))) == DEFAULT_TOP_K
    assert shortlist(plan(Sampling(temperature=0.7, top_k=5))) == 5
    # Whatever must see every logit first, or keeps too many to narrow: the whole vocabulary.
    assert shortlist(plan(Sampling(temperature=0.7, top_k=0))) is None
    assert shortlist(plan(Sampling(temperature=0.7, top_k=MAX_SHORTLIST + 1))) is None
    assert shortlist(plan(Sampling(temperature=0, repeat_penalty=1.1))) is None
    assert shortlist(plan(Sampling(temperature=0.7, logit_bias=((5, 2.0),)))) is None


def test_top_candidates_hold_the_k_largest_and_few_others() -> None:
    rng = np.random.default_rng(0)
    for trial in range(200):
        logits = (rng.standard_normal(49152) * rng.uniform(0.5, 6)).astype(np.float32)
        if trial % 3 == 0:  # a peaked distribution, as a confident model gives
            logits[rng.integers(0, 49152, 5)] += 30
        if trial % 5 == 0:  # ties at the top
            logits[rng.integers(0, 49152, 60)] = logits.max()
        k = int(rng.integers(1, MAX_SHORTLIST + 1))
        ids = top_candidates(logits, k)
        assert ids is not None
        kth = np.sort(logits)[-k]
        assert set(np.flatnonzero(logits >= kth)) <= set(ids.tolist())
        assert list(ids) == sorted(ids)
        if trial % 5:
            assert len(ids) < 4 * STRIDE * k + 64


def test_a_small_vocabulary_is_not_narrowed() -> None:
    assert top_candidates(np.zeros(STRIDE * 4 * 5 - STRIDE, dtype=np.float32), 5) is None
    size = STRIDE * 40 + 3  # the logits between the sampled ones count too
    ids = top_candidates(np.arange(size, dtype=np.float32), 5)
    assert ids is not None and set(range(size - 5, size)) <= set(ids.tolist())

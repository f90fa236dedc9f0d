"""How a sequence picks its tokens: the request's sampling options, the plan of samplers, the llama.cpp chain.

`plan()` is pure and decides which samplers run in which order; `build_chain()` turns a plan into
llama.cpp's sampler chain. Samplers that narrow the candidates run first, so the costly ones (top-p's sort,
the softmax) see tens of candidates rather than the whole vocabulary.

`shortlist()` and `top_candidates()` are pure too: a chain that starts by keeping the k largest logits (greedy:
the largest) never looks at the rest, so the chain is given a few hundred candidates that surely hold those k,
not the whole vocabulary (llama.cpp's own entry point copies all of it into a fresh array on every token).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import llama_cpp as ll
import numpy as np

PENALTY_LAST_N = 64  # tokens the repetition penalties look back over (llama.cpp's default)
# Candidates kept when a request names no top_k: llama-server's and Ollama's default. Without it top-p sorts
# the whole vocabulary at every token of every sampled sequence (measured: the sampled path fell behind
# llama-server, which applies this default too).
DEFAULT_TOP_K = 40


@dataclass(frozen=True, slots=True)
class Sampling:
    """A request's sampling options; temperature 0 is greedy, top_k None takes DEFAULT_TOP_K (0: no limit)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_penalty: float = 1.0
    grammar: str | None = None  # GBNF the output must follow (response_format), checked when the request came
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, what is added to its logit), OpenAI's logit_bias


# One step of a plan: the sampler's name and its arguments, as llama.cpp's sampler_init_<name> takes them.
Step = tuple[str, tuple[float | int | str, ...]]


def plan(sampling: Sampling) -> list[Step]:
    """The samplers for these options, in the order they run. A grammar is not one of them: it is checked apart
    (see LlamaModel.sample), on the token the chain picks, as llama-server does."""
    steps: list[Step] = []
    if sampling.logit_bias:  # first, as llama-server has it: every later step sees the biased logits
        steps.append(("logit_bias", tuple(value for pair in sampling.logit_bias for value in pair)))
    if sampling.repeat_penalty != 1.0 or sampling.frequency_penalty or sampling.presence_penalty:
        penalties = (sampling.repeat_penalty, sampling.frequency_penalty, sampling.presence_penalty)
        steps.append(("penalties", (PENALTY_LAST_N, *penalties)))
    if sampling.temperature <= 0:
        steps.append(("greedy", ()))
        return steps
    top_k = DEFAULT_TOP_K if sampling.top_k is None else sampling.top_k
    if top_k > 0:
        steps.append(("top_k", (top_k,)))
    if sampling.top_p < 1.0:
        steps.append(("top_p", (sampling.top_p, 1)))
    if sampling.min_p > 0.0:
        steps.append(("min_p", (sampling.min_p, 1)))
    steps.append(("temp", (sampling.temperature,)))
    steps.append(("dist", (ll.LLAMA_DEFAULT_SEED if sampling.seed is None else sampling.seed & 0xFFFFFFFF,)))
    return steps


# The most candidates a chain may start by keeping for the shortlist to serve it: a shortlist holds about
# STRIDE * k tokens, so a larger k is handed the whole vocabulary, as before.
MAX_SHORTLIST = 64
# Every STRIDE-th logit is the sample whose k-th largest bounds the k-th largest logit (top_candidates).
STRIDE = 4


def shortlist(steps: list[Step]) -> int | None:
    """How many of the largest logits the chain can ever look at: 1 for plain greedy, k for a chain that
    starts with top_k k; None when it needs the whole vocabulary (a bias or a penalty first, no top_k, a large
    one)."""
    if not steps:
        return None
    name, args = steps[0]
    if name == "greedy":
        return 1
    if name == "top_k" and 0 < int(args[0]) <= MAX_SHORTLIST:
        return int(args[0])
    return None


def top_candidates(logits: np.ndarray[Any, Any], k: int) -> np.ndarray[Any, Any] | None:
    """The ids, ascending, of a few tokens among which are surely the `k` largest logits (with every tie of
    the k-th); None when the vocabulary is too small to narrow it this way.

    Why it holds: the k-th largest of every STRIDE-th logit is a value that k different logits reach, so the
    k-th largest logit is at least that, and every logit the top k hold passes this floor. About STRIDE * k
    others do (measured: 158 of 49,152 for k = 40). Strides of 8 and 16 read less but hand the chain more;
    groups' maxima cost more than the sample (measured in the engine: 64 us a pick at 4, 70 and 81 at 8 and 16,
    85 for llama.cpp's whole vocabulary).
    """
    sample = logits[::STRIDE]
    size = len(sample)
    if size < 4 * k:
        return None
    floor = np.partition(sample, size - k)[size - k]
    return np.flatnonzero(logits >= floor)


def build_chain(steps: list[Step], n_vocab: int) -> Any:
    """A llama.cpp sampler chain running `steps` over a vocabulary of `n_vocab` tokens; the caller frees it with
    free_chain."""
    chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
    for name, args in steps:
        if name == "logit_bias":
            pairs = [ll.llama_logit_bias(int(args[i]), float(args[i + 1])) for i in range(0, len(args), 2)]
            biases = (ll.llama_logit_bias * len(pairs))(*pairs)  # llama.cpp copies them
            sampler = ll.llama_sampler_init_logit_bias(n_vocab, len(pairs), biases)
        elif name == "penalties":
            # The bindings declare an old five-argument signature (n_vocab first); llama.cpp now takes four.
            # Passing the look-back in both integer places is right under either.
            last_n = args[0]
            sampler = ll.llama_sampler_init_penalties(last_n, *args)
        else:
            sampler = getattr(ll, f"llama_sampler_init_{name}")(*args)
        ll.llama_sampler_chain_add(chain, sampler)
    return chain


def grammar_sampler(vocab: Any, grammar: str) -> Any:
    """llama.cpp's grammar sampler for GBNF `grammar` (root rule `root`), or None if it does not parse."""
    sampler = ll.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
    return sampler or None


def free_chain(chain: Any) -> None:
    """Release a chain that build_chain() made, or a grammar sampler."""
    if chain is not None:
        ll.llama_sampler_free(chain)

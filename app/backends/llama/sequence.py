"""What the engine decodes: a request's generation (Sequence: its prompt, sampling, progress and parked state)
and a batch of inputs to embed (Embedding). Their fields belong to the engine thread once submitted."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from app.backends.llama.events import TokenLogprob
from app.backends.llama.sampling import Sampling, build_chain, free_chain, grammar_sampler, plan, shortlist
from app.backends.llama.stop_text import StopText

if TYPE_CHECKING:
    from app.backends.llama.model import LlamaModel


class Sequence:
    """One request's generation. Its fields belong to the engine thread once submitted."""

    __slots__ = (
        "cached",
        "cancelled",
        "forks",
        "generated",
        "grammar",
        "history",
        "id",
        "logit_index",
        "logprobs",
        "max_tokens",
        "next_token",
        "park_id",
        "park_wanted",
        "parked",
        "pending",
        "prefilled",
        "prompt",
        "sampler",
        "sampling",
        "shortlist",
        "sink",
        "text",
        "urgent",
    )

    def __init__(
        self,
        prompt: list[int],
        sampling: Sampling,
        max_tokens: int,
        stops: tuple[str, ...],
        sink: Any,
        urgent: bool = False,
        logprobs: int | None = None,
    ):
        self.prompt = prompt
        self.logprobs = logprobs  # None: none asked; else how many alternatives per token
        self.sampling = sampling
        self.max_tokens = max_tokens
        self.text = StopText(stops)
        self.sink = sink  # where this sequence's events go; opaque to the engine
        self.urgent = urgent  # a high-priority request: its prompt goes through the model alone
        self.cancelled = False
        self.id = -1
        self.prefilled = 0
        self.generated = 0
        self.next_token: int | None = None
        self.logit_index = -1
        self.sampler: Any = None
        self.shortlist: int | None = None  # how many of the largest logits its chain looks at (None: all)
        self.grammar: Any = None  # llama.cpp's grammar sampler, for response_format or a required tool call
        self.cached = 0  # prompt tokens whose KV was reused from the previous request on this id
        self.history: list[int] = []  # tokens decoded into this sequence's KV cells
        self.park_wanted = False  # asked to give its slot up at the next step (under the engine's lock)
        self.parked = False  # off the batch, its cells kept aside (under the engine's lock)
        self.park_id = -1  # the parking sequence holding its cells while parked
        self.pending: list[TokenLogprob] = []  # logprobs of tokens whose text is not out yet
        self.forks: list[Sequence] = []  # the other choices, waiting for this one's prompt (see submit)

    @property
    def generating(self) -> bool:
        """Whether it has a token to add at the next step (a fork may have one before its prompt is all in)."""
        return self.next_token is not None and self.prefilled == len(self.prompt)

    def build_samplers(self, model: LlamaModel) -> None:
        """Its sampler chain (and grammar, if it has one) on `model`'s vocabulary: llama.cpp objects to free."""
        steps = plan(self.sampling)
        self.sampler = build_chain(steps, model.vocab_size)
        self.shortlist = shortlist(steps)
        if self.sampling.grammar is not None:
            self.grammar = grammar_sampler(model.vocab, self.sampling.grammar)

    def free_samplers(self) -> None:
        free_chain(self.sampler)
        free_chain(self.grammar)
        self.sampler = self.grammar = None


class Embedding:
    """Inputs to embed (token ids), and where their Embedded (or Failed) goes."""

    __slots__ = ("cancelled", "inputs", "sink")

    def __init__(self, inputs: list[list[int]], sink: Any):
        self.inputs = inputs
        self.sink = sink
        self.cancelled = False

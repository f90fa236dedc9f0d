"""LlamaEngine on the bundled model, without HTTP: how llama.cpp is asked to decode concurrent sequences."""

from __future__ import annotations

import logging
import threading
from typing import Any

import llama_cpp as ll
import pytest

from app.backends.llama import default_model_path
from app.backends.llama_engine import EngineConfig, Event, LlamaEngine, Sampling, Sequence, _common_prefix

PROMPTS = ["Name three colors.", "What is the capital of France?", "Write a haiku about rain.", "Hi."]


class _MicroBatches(logging.Handler):
    """Counts llama.cpp's "added ubatch" debug lines: one per micro-batch, each a pass over the weights."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "added ubatch" in record.getMessage():
            self.count += 1


class Runs:
    """Submits chat prompts to an engine and collects what each produced, keyed by its sink."""

    def __init__(self) -> None:
        self.engine: LlamaEngine | None = None
        self.texts: dict[object, str] = {}
        self.ends: dict[object, Event] = {}
        self._settled = threading.Condition()

    def deliver(self, events: list[tuple[Any, Event]]) -> None:
        with self._settled:
            for sink, event in events:
                if event[0] == "delta":
                    self.texts[sink] = self.texts.get(sink, "") + event[1]
                else:
                    self.ends[sink] = event
            self._settled.notify_all()

    def submit(self, sink: object, prompt: str, max_tokens: int, system: str = "") -> None:
        assert self.engine is not None
        head = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
        text = f"{head}<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
        self.engine.submit(Sequence(self.engine.tokenize(text, True), Sampling(temperature=0), max_tokens, (), sink))

    def wait(self, sinks: list[object]) -> None:
        with self._settled:
            assert self._settled.wait_for(lambda: all(sink in self.ends for sink in sinks), 60)

    def wait_for_text(self, sink: object) -> None:
        with self._settled:
            assert self._settled.wait_for(lambda: sink in self.texts, 60)

    def run(self, requests: list[tuple[object, str, int]]) -> None:
        for sink, prompt, max_tokens in requests:
            self.submit(sink, prompt, max_tokens)
        self.wait([sink for sink, _, _ in requests])


def start_engine() -> tuple[LlamaEngine, Runs]:
    runs = Runs()
    runs.engine = LlamaEngine(
        EngineConfig(default_model_path(), n_ctx=256, n_seq=4, n_threads=2, n_gpu_layers=0), runs.deliver
    )
    runs.engine.load()
    return runs.engine, runs


def test_generating_sequences_share_one_micro_batch_per_step(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMA_BATCH_DEBUG", "1")  # read when the context is created
    counter = _MicroBatches()
    logger = logging.getLogger("app.backends.llama")
    level = logger.level
    logger.setLevel(logging.DEBUG)  # setLevel, not the attribute: it also clears the logger's level cache
    logger.addHandler(counter)
    steps: list[tuple[int, int]] = []  # (tokens in the batch, micro-batches llama.cpp split it into)
    decode = ll.llama_decode

    def counting_decode(ctx: Any, batch: Any) -> int:
        before = counter.count
        status = int(decode(ctx, batch))
        steps.append((batch.n_tokens, counter.count - before))
        return status

    monkeypatch.setattr(ll, "llama_decode", counting_decode)
    engine, runs = start_engine()
    # Five requests for four slots: the short first one ends early and the fifth takes its slot; those that end
    # by end of text leave gaps between busy ids (here the second, at its 7th token), which the engine closes
    # by moving the highest slot down.
    requests = [
        (index, prompt, max_tokens)
        for index, (prompt, max_tokens) in enumerate(zip([*PROMPTS, PROMPTS[0]], [3, 16, 16, 16, 12], strict=True))
    ]
    try:
        runs.run(requests)
        together = len(steps)
        for index, prompt, max_tokens in requests:
            runs.run([(("alone", index), prompt, max_tokens)])
    finally:
        engine.close()
        logger.removeHandler(counter)
        logger.setLevel(level)

    assert all(runs.ends[index][0] == "done" for index, _, _ in requests), runs.ends
    # Greedy tokens do not depend on what else decoded beside them, nor on the slot's KV being moved.
    assert [runs.texts[index] for index, _, _ in requests] == [runs.texts["alone", index] for index, _, _ in requests]
    # Once the prompts were in (every prompt step has more than four tokens; the fifth found its prompt
    # resident), every step was a single micro-batch, however the slots came and went.
    prompts_in = max(index for index, (tokens, _) in enumerate(steps[:together]) if tokens > 4)
    generating = steps[prompts_in + 1 : together]
    assert len(generating) >= 12
    assert [split for _, split in generating] == [1] * len(generating), steps


def test_a_prompt_takes_the_prefix_another_slot_holds() -> None:
    system = "You are a terse assistant who answers questions about geography and nothing else, in one line."
    engine, runs = start_engine()
    try:
        runs.submit("first", "What is the capital of France?", 24, system)
        # Once the first is generating, the second (same system prompt) goes to the next slot, which holds
        # nothing: it copies the first one's cells for the shared prefix and evaluates only its question.
        runs.wait_for_text("first")
        runs.submit("second", "What is the capital of Spain?", 24, system)
        runs.wait(["first", "second"])
        runs.submit(("alone", "second"), "What is the capital of Spain?", 24, system)
        runs.wait([("alone", "second")])
    finally:
        engine.close()

    done, _, prompt_tokens, _, cached = runs.ends["second"]
    assert done == "done"
    assert 20 <= cached < prompt_tokens - 5  # the system prompt's tokens, not the question's
    assert runs.ends["first"][4] == 0
    assert runs.texts["second"] == runs.texts["alone", "second"]


def test_common_prefix_is_exact_across_the_compared_blocks() -> None:
    tokens = list(range(1000, 2000))
    for length in (0, 1, 255, 256, 257, 511, 512, 513, 999):
        assert _common_prefix(tokens, [*tokens[:length], -1]) == length
        assert _common_prefix([*tokens[:length], -1], tokens) == length
    assert _common_prefix(tokens, tokens) == len(tokens)
    assert _common_prefix(tokens, tokens[:300]) == 300
    assert _common_prefix([], tokens) == 0

"""LlamaEngine on the bundled model, without HTTP: how llama.cpp is asked to decode concurrent sequences."""

from __future__ import annotations

import logging
import threading
from typing import Any

import llama_cpp as ll
import pytest

from app.backends.llama import default_model_path
from app.backends.llama_engine import EngineConfig, Event, LlamaEngine, Sampling, Sequence

PROMPTS = ["Name three colors.", "What is the capital of France?", "Write a haiku about rain.", "Hi."]


class _MicroBatches(logging.Handler):
    """Counts llama.cpp's "added ubatch" debug lines: one per micro-batch, each a pass over the weights."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "added ubatch" in record.getMessage():
            self.count += 1


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
    texts: dict[object, str] = {}
    ends: dict[object, Event] = {}
    settled = threading.Condition()

    def deliver(events: list[tuple[Any, Event]]) -> None:
        with settled:
            for sink, event in events:
                if event[0] == "delta":
                    texts[sink] = texts.get(sink, "") + event[1]
                else:
                    ends[sink] = event
            settled.notify_all()

    def run(engine: LlamaEngine, requests: list[tuple[object, str, int]]) -> None:
        for sink, prompt, max_tokens in requests:
            tokens = engine.tokenize(f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n", True)
            engine.submit(Sequence(tokens, Sampling(temperature=0), max_tokens, (), sink))
        with settled:
            assert settled.wait_for(lambda: all(sink in ends for sink, _, _ in requests), 60)

    engine = LlamaEngine(EngineConfig(default_model_path(), n_ctx=256, n_seq=4, n_threads=2, n_gpu_layers=0), deliver)
    engine.load()
    # Five requests for four slots: the short first one ends early and the fifth takes its slot; the second
    # ends early too (end of text), leaving ids 0, 2 and 3 busy until the highest moves down to 1.
    requests = [
        (index, prompt, max_tokens)
        for index, (prompt, max_tokens) in enumerate(zip([*PROMPTS, PROMPTS[0]], [3, 16, 16, 16, 12], strict=True))
    ]
    try:
        run(engine, requests)
        together = len(steps)
        for index, prompt, max_tokens in requests:
            run(engine, [(("alone", index), prompt, max_tokens)])
    finally:
        engine.close()
        logger.removeHandler(counter)
        logger.setLevel(level)

    assert all(ends[index][0] == "done" for index, _, _ in requests), ends
    # Greedy tokens do not depend on what else decoded beside them, nor on the slot's KV being moved.
    assert [texts[index] for index, _, _ in requests] == [texts["alone", index] for index, _, _ in requests]
    # Once the prompts were in (every prompt step has more than four tokens; the fifth found its prompt
    # resident), every step was a single micro-batch, however the slots came and went.
    prompts_in = max(index for index, (tokens, _) in enumerate(steps[:together]) if tokens > 4)
    generating = steps[prompts_in + 1 : together]
    assert len(generating) >= 12
    assert [split for _, split in generating] == [1] * len(generating), steps

"""LlamaEngine on the bundled model, without HTTP: batched answers equal lone ones, and how steps are batched."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from app.backends.llama import default_model_path
from app.backends.llama.engine import LlamaEngine
from app.backends.llama.events import Delta, Done, Event
from app.backends.llama.model import EngineConfig, LlamaModel
from app.backends.llama.sampling import Sampling, build_chain, free_chain, plan, shortlist
from app.backends.llama.sequence import Sequence

PROMPTS = ["Name three colors.", "What is the capital of France?", "Write a haiku about rain.", "Hi."]


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
                if isinstance(event, Delta):
                    self.texts[sink] = self.texts.get(sink, "") + event.text
                else:
                    self.ends[sink] = event
            self._settled.notify_all()

    def submit(self, sink: object, prompt: str, max_tokens: int, system: str = "") -> None:
        assert self.engine is not None
        head = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
        text = f"{head}<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
        tokens = self.engine.model.tokenize(text, True)
        self.engine.submit(Sequence(tokens, Sampling(temperature=0), max_tokens, (), sink))

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


def until(condition: Callable[[], bool], seconds: float = 30) -> bool:
    """Whether `condition` holds within `seconds` (the engine thread changes what it reads)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def start_engine() -> tuple[LlamaEngine, Runs]:
    runs = Runs()
    runs.engine = LlamaEngine(
        EngineConfig(default_model_path(), n_ctx=256, n_seq=4, n_threads=2, n_gpu_layers=0), runs.deliver
    )
    runs.engine.load()
    return runs.engine, runs


def test_batched_answers_equal_lone_ones_and_each_step_is_one_run_of_slots(monkeypatch: pytest.MonkeyPatch) -> None:
    # The slot ids of every decoded batch, in batch order: llama.cpp decodes sequences in one pass over the
    # weights only when their ids ascend by one in the batch.
    batches: list[list[int]] = []
    decode = LlamaModel.decode

    def recording_decode(model: LlamaModel) -> int:
        batch = model.batch
        batches.append([batch.seq_id[i][0] for i in range(batch.n_tokens)])
        return decode(model)

    monkeypatch.setattr(LlamaModel, "decode", recording_decode)
    engine, runs = start_engine()
    # Five requests for four slots: the short first one ends early and the fifth takes its slot; those that end
    # by end of text leave gaps between busy ids, which the engine closes by moving the highest slot down.
    requests = [
        (index, prompt, max_tokens)
        for index, (prompt, max_tokens) in enumerate(zip([*PROMPTS, PROMPTS[0]], [3, 16, 16, 16, 12], strict=True))
    ]
    try:
        runs.run(requests)
        together = len(batches)
        for index, prompt, max_tokens in requests:
            runs.run([(("alone", index), prompt, max_tokens)])
    finally:
        engine.close()

    assert all(isinstance(runs.ends[index], Done) for index, _, _ in requests), runs.ends
    # Greedy tokens do not depend on what else decoded beside them, nor on the slot's KV being moved.
    assert [runs.texts[index] for index, _, _ in requests] == [runs.texts["alone", index] for index, _, _ in requests]
    # Once the prompts were in (every prompt step has more than four tokens), every step carried one token
    # of each generating slot, ids ascending by one: a single pass over the weights.
    prompts_in = max(index for index, ids in enumerate(batches[:together]) if len(ids) > 4)
    generating = batches[prompts_in + 1 : together]
    assert len(generating) >= 12
    for ids in generating:
        assert ids == list(range(ids[0], ids[0] + len(ids))), batches
    assert max(len(ids) for ids in generating) == 4


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

    second, first = runs.ends["second"], runs.ends["first"]
    assert isinstance(second, Done) and isinstance(first, Done)
    assert 20 <= second.cached_tokens < second.prompt_tokens - 5  # the system prompt's tokens, not the question's
    assert first.cached_tokens == 0
    assert runs.texts["second"] == runs.texts["alone", "second"]


def test_a_parked_sequence_resumes_where_it_stopped_and_its_greedy_text_is_unchanged() -> None:
    runs = Runs()
    engine = runs.engine = LlamaEngine(
        EngineConfig(default_model_path(), n_ctx=256, n_seq=4, n_threads=2, n_gpu_layers=0, n_parked=2), runs.deliver
    )
    engine.load()
    try:
        prompts = [f"Tell me a long story about {topic}." for topic in ("a cat", "the sea", "a robot", "winter")]
        runs.run([(("alone", n), prompt, 48) for n, prompt in enumerate(prompts)])  # the unpreempted texts
        sequences = []
        for n, prompt in enumerate(prompts):
            text = f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
            sequence = Sequence(engine.model.tokenize(text, True), Sampling(temperature=0), 48, (), ("paused", n))
            sequences.append(sequence)
            engine.submit(sequence)
        runs.wait_for_text(("paused", 3))
        engine.park(sequences[3])
        engine.park(sequences[2])
        assert until(lambda: sequences[3].parked and sequences[2].parked)
        engine.park(sequences[1])  # only two parking places: this one asks at every step, and keeps going
        runs.run([("urgent", "Hi.", 8)])  # takes a freed slot while two wait parked
        with runs._settled:
            stalled = {n: runs.texts.get(("paused", n), "") for n in (2, 3)}
        engine.resume(sequences[1])
        runs.wait([("paused", 0), ("paused", 1)])
        with runs._settled:
            assert {n: runs.texts.get(("paused", n), "") for n in (2, 3)} == stalled  # parked: nothing more
            assert ("paused", 2) not in runs.ends and ("paused", 3) not in runs.ends
        engine.resume(sequences[3])
        engine.resume(sequences[2])
        runs.wait([("paused", n) for n in range(4)])
        for n in range(4):
            assert runs.texts[("paused", n)] == runs.texts[("alone", n)], n
            paused, alone = runs.ends[("paused", n)], runs.ends[("alone", n)]
            assert isinstance(paused, Done) and isinstance(alone, Done)
            assert (paused.finish_reason, paused.completion_tokens) == (alone.finish_reason, alone.completion_tokens)
        # A parked sequence that is cancelled frees its parking place.
        text = "<|im_start|>user\nCount to fifty.<|im_end|>\n<|im_start|>assistant\n"
        doomed = Sequence(engine.model.tokenize(text, True), Sampling(temperature=0), 200, (), "doomed")
        engine.submit(doomed)
        runs.wait_for_text("doomed")
        engine.park(doomed)
        assert until(lambda: doomed.parked)
        engine.cancel(doomed)
        runs.run([("after", "Hi.", 4)])
        assert not engine.slots.parked and len(engine.slots.park_ids) == 2
    finally:
        engine.close()


def _chat(engine: LlamaEngine, prompt: str) -> list[int]:
    return engine.model.tokenize(f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n", True)


def test_choices_fork_from_one_prompt_evaluation_and_answer_as_lone_requests_with_their_seeds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The tokens each decode carried, as (slot, position): how often each prompt position went through the model.
    added: list[tuple[int, int]] = []
    add = LlamaModel.add

    def recording_add(model: LlamaModel, slot: int, token: int, position: int, logits: bool) -> int:
        added.append((slot, position))
        return add(model, slot, token, position, logits)

    monkeypatch.setattr(LlamaModel, "add", recording_add)
    engine, runs = start_engine()
    try:
        prompt = _chat(engine, "Write a short poem about the moon and the stars.")
        sampling = [Sampling(temperature=1.0, seed=40 + i) for i in range(3)]
        group = [Sequence(prompt, sampling[i], 24, (), ("group", i)) for i in range(3)]
        engine.submit(*group)
        runs.wait([("group", i) for i in range(3)])
        evaluated = [position for _, position in added if position < len(prompt)]
        for i in range(3):  # each choice alone, on a fresh slot's worth of work
            added.clear()
            engine.submit(Sequence(prompt, sampling[i], 24, (), ("alone", i)))
            runs.wait([("alone", i)])
    finally:
        engine.close()

    assert sorted(evaluated) == list(range(len(prompt)))  # every prompt token decoded once, for all three
    texts = [runs.texts[("group", i)] for i in range(3)]
    assert texts == [runs.texts[("alone", i)] for i in range(3)]  # choice i is a lone request with seed 40 + i
    assert len(set(texts)) == 3
    for i in range(3):
        done = runs.ends[("group", i)]
        assert isinstance(done, Done) and done.prompt_tokens == len(prompt)


def test_forks_that_end_on_their_first_token_or_are_cancelled_free_everything() -> None:
    engine, runs = start_engine()
    try:
        prompt = _chat(engine, "Say yes.")
        # One token each: every fork ends at the step its leader's prompt went in, without a slot of its own.
        short = [Sequence(prompt, Sampling(temperature=1.0, seed=i), 1, (), ("short", i)) for i in range(4)]
        engine.submit(*short)
        runs.wait([("short", i) for i in range(4)])
        assert all(isinstance(runs.ends[("short", i)], Done) for i in range(4))
        assert all(runs.ends[("short", i)].completion_tokens == 1 for i in range(4))  # type: ignore[union-attr]
        # A group cancelled while it runs, and one whose leader alone is cancelled before it starts: the
        # others go on, one of them evaluating the prompt in its place.
        story = _chat(engine, "Tell me a long story about the sea.")
        long = [Sequence(story, Sampling(temperature=1.0, seed=i), 200, (), ("long", i)) for i in range(3)]
        engine.submit(*long)
        runs.wait_for_text(("long", 2))
        for sequence in long:
            engine.cancel(sequence)
        heirs = [Sequence(prompt, Sampling(temperature=0), 8, (), ("heir", i)) for i in range(3)]
        heirs[0].cancelled = True
        engine.submit(*heirs)
        runs.wait([("heir", 1), ("heir", 2)])
        runs.run([("after", "Hi.", 4)])
        assert ("heir", 0) not in runs.ends and not any(("long", i) in runs.ends for i in range(3))
        assert until(lambda: len(engine.slots.free_ids) == 4 and not engine.slots.active and not engine._waiting)
    finally:
        engine.close()


def test_a_shortlisted_pick_is_the_token_the_whole_vocabulary_gives() -> None:
    """The chain given a shortlist (greedy's largest logit, top_k's candidates) picks what llama.cpp picks
    over every token, seeded chains included: token for token over a whole answer."""
    model = LlamaModel(EngineConfig(default_model_path(), 512, 1, 2, 0))
    text = "<|im_start|>user\nWrite a long story about a dragon.<|im_end|>\n<|im_start|>assistant\n"
    prompt = model.tokenize(text, True)
    try:
        for sampling in (
            Sampling(temperature=0),
            Sampling(temperature=0.9, top_p=0.95, seed=3),
            Sampling(temperature=1.5, top_k=20, seed=11),
        ):
            steps = plan(sampling)
            assert shortlist(steps) is not None
            short, whole = build_chain(steps, model.vocab_size), build_chain(steps, model.vocab_size)
            model.clear(0)
            for position, token in enumerate(prompt):
                index = model.add(0, token, position, position == len(prompt) - 1)
            picked = []
            for position in range(len(prompt), len(prompt) + 48):
                assert model.decode() == 0
                token = model.sample(short, index, None, shortlist(steps))
                assert token == model.sample(whole, index)
                picked.append(token)
                index = model.add(0, token, position, True)
            model.batch.n_tokens = 0
            free_chain(short)
            free_chain(whole)
            assert len(set(picked)) > 10  # a real answer, not one token over and over
    finally:
        model.free()

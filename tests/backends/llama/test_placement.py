"""The KV slot placement policy on plain data: which slot a prompt takes, what it copies, which slots move."""

from __future__ import annotations

from app.backends.llama.placement import (
    MIN_COPY_TOKENS,
    SHORT_PROMPT_TOKENS,
    Move,
    Placement,
    close_gaps,
    common_prefix,
    place,
    prompt_chunks,
    runs,
)

SYSTEM = list(range(100, 140))  # a 40-token system prompt that chat requests share


def test_an_idle_engine_places_on_the_lowest_slot_reusing_nothing() -> None:
    assert place([1, 2, 3], [[], [], [], []], busy=[], free=[0, 1, 2, 3], fresh=set()) == Placement(0, 0)


def test_a_new_sequence_keeps_the_busy_slots_one_run() -> None:
    # Slots 0 and 1 generate; slot 3 holds a longer prefix, but taking it would split the run (two passes a step).
    resident = [[9], [8], [], [*SYSTEM, 7]]
    placed = place([*SYSTEM, 1, 2], resident, busy=[0, 1], free=[2, 3], fresh=set())
    assert placed.slot == 2
    # ... and copies the prefix from slot 3, which holds all 40 shared tokens.
    assert placed == Placement(2, len(SYSTEM), copy_from=3)


def test_among_equal_runs_the_longest_resident_prefix_wins_without_a_copy() -> None:
    resident = [[1, 2], [*SYSTEM, 5], [], []]
    assert place([*SYSTEM, 6], resident, busy=[], free=[0, 1, 2, 3], fresh=set()) == Placement(1, len(SYSTEM))


def test_a_copy_is_made_only_when_it_saves_enough_tokens() -> None:
    short = SYSTEM[: MIN_COPY_TOKENS - 1]
    assert place([*short, 1], [[7], [*short, 2]], busy=[1], free=[0], fresh=set()) == Placement(0, 0)
    enough = SYSTEM[:MIN_COPY_TOKENS]
    assert place([*enough, 1], [[7], [*enough, 2]], busy=[1], free=[0], fresh=set()) == Placement(
        0, MIN_COPY_TOKENS, copy_from=1
    )


def test_a_slot_filled_by_a_copy_this_step_is_not_copied_from() -> None:
    resident = [[], [*SYSTEM, 5], [*SYSTEM, 6]]
    # Slot 1 was itself filled by a copy this step: its cells exist only after the next decode.
    assert place([*SYSTEM, 7], resident, busy=[], free=[0], fresh={1}) == Placement(0, len(SYSTEM), copy_from=2)
    assert place([*SYSTEM, 7], resident, busy=[], free=[0], fresh={1, 2}) == Placement(0, 0)


def test_the_last_prompt_token_is_always_evaluated() -> None:
    prompt = [*SYSTEM, 1]
    assert place(prompt, [prompt], busy=[], free=[0], fresh=set()) == Placement(0, len(prompt) - 1)


def test_gaps_close_by_moving_the_highest_down() -> None:
    assert close_gaps([0, 1, 2], [3]) == []
    assert close_gaps([0, 3], [1, 2]) == [Move(3, 1)]
    assert close_gaps([0, 2, 5], [1, 3, 4]) == [Move(5, 1)]
    assert close_gaps([1, 4, 6], [0, 2, 3, 5]) == [Move(6, 2), Move(4, 3)]
    assert close_gaps([], [0, 1]) == []


def test_runs_count_consecutive_ids() -> None:
    assert [runs(ids) for ids in ([], [3], [0, 1, 2], [2, 0, 1], [0, 2], [0, 1, 3, 5, 6])] == [0, 1, 1, 1, 2, 3]


def test_common_prefix_is_exact_across_the_compared_blocks() -> None:
    tokens = list(range(1000, 2000))
    for length in (0, 1, 255, 256, 257, 511, 512, 513, 999):
        assert common_prefix(tokens, [*tokens[:length], -1]) == length
        assert common_prefix([*tokens[:length], -1], tokens) == length
    assert common_prefix(tokens, tokens) == len(tokens)
    assert common_prefix(tokens, tokens[:300]) == 300
    assert common_prefix([], tokens) == 0


def test_a_step_evaluates_the_first_prompt_and_the_short_ones_along_with_it() -> None:
    # Four chat requests whose system prompt a slot holds: all four last messages in one step.
    assert prompt_chunks([9, 8, 9, 7], 0, 508, alone=False) == [9, 8, 9, 7]
    # A long prompt goes first (the earliest placed) with what room there is; long ones wait their turn.
    assert prompt_chunks([900, 300, 5], 0, 508, alone=False) == [508, 0, 0]
    assert prompt_chunks([200, 300, 5, SHORT_PROMPT_TOKENS + 1], 0, 508, alone=False) == [200, 0, 5, 0]
    # An urgent prompt goes first and alone, wherever it was placed.
    assert prompt_chunks([5, 5, 40], 2, 512, alone=True) == [0, 0, 40]
    # Short prompts come along only while there is room.
    assert prompt_chunks([10, 10, 10], 0, 22, alone=False) == [10, 10, 0]
    assert prompt_chunks([], 0, 512, alone=False) == []

"""Where sequences live in the KV cache: which slot a prompt takes, what it copies, which slots move, and which
prompts a decode step evaluates.

Pure planning on plain data (token lists and slot ids); the engine carries the plans out on llama.cpp's
memory. Two costs drive every choice, both measured with the bundled model on 2 cores:
- llama.cpp decodes sequences with consecutive slot ids in one pass over the weights (a KV buffer per
  sequence); each further run of ids costs another pass at every step while they generate;
- a slot's cells can be copied from another (one buffer copy: 6-8 ms, about what two prompt tokens cost
  at 3.6 ms each), so a prompt reuses whatever prefix any slot holds, once that saves MIN_COPY_TOKENS.
"""

from __future__ import annotations

from dataclasses import dataclass

MIN_COPY_TOKENS = 4  # twice the copy's cost in prompt tokens: a copy pays for itself with room to spare
# A prompt with at most this many tokens left rides along with the step's first prompt rather than wait for a
# step of its own: about what one more pass over the weights costs (4-5 ms, two prompt tokens' worth) plus the
# step's tokens it delays, while it starts its stream a step or more sooner (see prompt_chunks).
SHORT_PROMPT_TOKENS = 16
_PREFIX_BLOCK = 256


@dataclass(frozen=True, slots=True)
class Placement:
    """Put a prompt in `slot`: first copy `copy_from`'s cells there (if set), then keep its first `keep` tokens."""

    slot: int
    keep: int
    copy_from: int | None = None


@dataclass(frozen=True, slots=True)
class Move:
    """Move the sequence in slot `source` to the free slot `target` (copy its cells, then clear the source)."""

    source: int
    target: int


def place(
    prompt: list[int], resident: list[list[int]], busy: list[int], free: list[int], fresh: set[int], whole: bool = False
) -> Placement:
    """Choose a free slot for `prompt` and the prefix it reuses.

    `resident[i]` is what slot i's cells hold; `busy` the slots generating; `fresh` the slots filled by a
    copy this step, which hold their cells only once the next decode has run and so cannot be copied from.
    The slot: fewest runs of consecutive busy ids first (a pass over the weights each, at every step), then
    the longest resident prefix (paid once), then the lowest id. Then, if another slot holds at least
    MIN_COPY_TOKENS more of the prompt (a shared system prompt, most often), its cells are copied. The last
    prompt token is never reused: its logits give the first generated token. With `whole` (a fork, whose first
    token came from its leader's logits), it is, and any slot that holds more of the prompt is copied from.
    """
    usable = len(prompt) if whole else len(prompt) - 1
    held = [min(common_prefix(tokens, prompt), usable) for tokens in resident]
    slot = min(free, key=lambda candidate: (runs([*busy, candidate]), -held[candidate], candidate))
    donors = [other for other in range(len(held)) if other != slot and other not in fresh]
    donor = max(donors, key=held.__getitem__, default=None)
    if donor is not None and held[donor] - held[slot] >= (1 if whole else MIN_COPY_TOKENS):
        return Placement(slot, held[donor], copy_from=donor)
    return Placement(slot, held[slot])


def close_gaps(busy: list[int], free: list[int]) -> list[Move]:
    """Moves that leave the busy slots one run of consecutive ids: the highest goes to the lowest gap, repeatedly.

    A move copies one KV buffer (about 5 ms with the bundled model); a gap costs a pass over the weights (about
    as much) at every step until it closes.
    """
    busy, free = sorted(busy), list(free)
    moves = []
    while busy and busy[-1] - busy[0] >= len(busy):
        source = busy.pop()
        target = min(slot for slot in free if slot > busy[0])
        free.remove(target)
        free.append(source)
        busy.insert(next((i for i, slot in enumerate(busy) if slot > target), len(busy)), target)
        moves.append(Move(source, target))
    return moves


def runs(ids: list[int]) -> int:
    """How many runs of consecutive numbers a set of slot ids makes."""
    ordered = sorted(ids)
    return sum(1 for index, slot in enumerate(ordered) if index == 0 or slot != ordered[index - 1] + 1)


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two lists share.

    Runs for every slot at every placement, on the engine thread: whole blocks are compared as slices (in C),
    and only the block with the first difference token by token.
    """
    limit = min(len(a), len(b))
    index = 0
    while index + _PREFIX_BLOCK <= limit and a[index : index + _PREFIX_BLOCK] == b[index : index + _PREFIX_BLOCK]:
        index += _PREFIX_BLOCK
    while index < limit and a[index] == b[index]:
        index += 1
    return index


def prompt_chunks(rests: list[int], first: int, room: int, alone: bool) -> list[int]:
    """How many tokens of each prompt in progress a step evaluates (0: it waits), given what is left of each
    (`rests`, in the order they were placed), which of them goes first (the urgent one, else the earliest),
    and the step's room for prompt tokens.

    The first takes what it needs of the room: its first token then waits for its own prompt, not for the
    long prompts that arrived with it. An urgent first goes `alone`. Otherwise every other prompt with at most
    SHORT_PROMPT_TOKENS left (what a prefix held in a slot leaves of a chat request: its last message) comes
    along whole: prompts that arrive together then start their streams at the same step, in one pass over
    the weights, rather than one step apart, each step's prompt a second pass beside the generating tokens
    (traced with 4 chat streams arriving at once, 8 prompt tokens each: 7 passes before all 4 generate, now
    3, the first prompt alone and then the others together).
    """
    chunks = [0] * len(rests)
    if not rests:
        return chunks
    chunks[first] = min(rests[first], room)
    room -= chunks[first]
    if alone:
        return chunks
    for index, rest in enumerate(rests):
        if index != first and rest <= min(SHORT_PROMPT_TOKENS, room):
            chunks[index] = rest
            room -= rest
    return chunks

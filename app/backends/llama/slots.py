"""The KV slots of the engine's context and what each holds: which sequence runs in which slot, which wait
parked, and the tokens each slot's cells keep. It carries out app.backends.llama.placement's plans on
llama.cpp's memory (place with prefix reuse, park, resume, close gaps, release). Engine thread only."""

from __future__ import annotations

import bisect
from collections import deque

from app.backends.llama import placement
from app.backends.llama.model import LlamaModel
from app.backends.llama.sequence import Sequence


class Slots:
    """n_seq slots that sequences run in, and n_parked parking places whose cells wait aside."""

    def __init__(self, n_seq: int, n_parked: int):
        self.model: LlamaModel | None = None  # set once the engine thread has loaded it
        self.free_ids = list(range(n_seq))
        self.park_ids = list(range(n_seq, n_seq + n_parked))
        self.parked: list[Sequence] = []
        # Per sequence id, the tokens in its KV cells (an active sequence's history, or what the last one
        # left): a new request evaluates only what no slot holds yet (chat requests repeat a system prompt).
        self.resident: list[list[int]] = [[] for _ in range(n_seq + n_parked)]
        self.copied: set[int] = set()  # slots filled by a copy this step (placement.place's `fresh`)
        self.active: list[Sequence] = []  # in id order
        self.prompting: deque[Sequence] = deque()  # active sequences whose prompt is not all in, in the order placed

    def _model(self) -> LlamaModel:
        assert self.model is not None
        return self.model

    def place(self, sequence: Sequence) -> int:
        """Give a waiting sequence a free slot, reusing whatever prefix of its prompt any slot holds (a fork: all
        of it, from its leader's slot, unless the leader's cells have gone meanwhile); how many tokens it reused."""
        prompt = sequence.prompt
        fork = sequence.next_token is not None
        busy = [s.id for s in self.active]
        plan_ = placement.place(prompt, self.resident, busy, self.free_ids, self.copied, whole=fork)
        slot, keep = plan_.slot, plan_.keep
        self.free_ids.remove(slot)
        model = self._model()
        if plan_.copy_from is not None:
            model.clear(slot)
            model.copy(plan_.copy_from, slot)
            self.copied.add(slot)
        if not model.cut(slot, keep):
            model.clear(slot)  # this memory cannot cut a sequence: start over
            keep = 0
        sequence.id = slot
        sequence.prefilled = keep
        sequence.history = self.resident[slot] = prompt[:keep]
        if not fork:
            sequence.cached = keep
            sequence.build_samplers(model)
        self._join(sequence)
        return keep

    def park(self, sequence: Sequence) -> None:
        """Take an active sequence off the batch: its cells go to a parking place, its slot is freed."""
        park = self.park_ids.pop()
        model = self._model()
        model.clear(park)
        model.copy(sequence.id, park)
        self.copied.add(park)
        self.resident[park] = list(sequence.history)
        self.resident[sequence.id] = list(sequence.history)  # its slot's cells stay, for a shared prefix
        self._leave(sequence)
        sequence.park_id, sequence.id = park, -1
        self.parked.append(sequence)

    def unpark(self, sequence: Sequence, slot: int | None) -> None:
        """Bring a parked sequence back into `slot` (None: it was cancelled, and only its parking is freed)."""
        park = sequence.park_id
        self.parked.remove(sequence)
        self.park_ids.append(park)
        sequence.park_id = -1
        if slot is None:
            sequence.free_samplers()
            return
        self.free_ids.remove(slot)
        model = self._model()
        model.clear(slot)
        model.copy(park, slot)
        self.copied.add(slot)
        sequence.id = slot
        self.resident[slot] = sequence.history
        self._join(sequence)

    def close_gaps(self) -> None:
        """Move sequences so that busy slots follow each other (placement.close_gaps): one pass over the weights."""
        for move in placement.close_gaps([s.id for s in self.active], self.free_ids):
            if move.source in self.copied:
                break  # its cells are a copy still to be made: it moves at a later step
            sequence = next(s for s in self.active if s.id == move.source)
            self.active.remove(sequence)
            model = self._model()
            model.clear(move.target)
            model.copy(move.source, move.target)
            model.clear(move.source)
            self.free_ids.remove(move.target)
            self.free_ids.append(move.source)
            self.resident[move.source] = []
            self.resident[move.target] = sequence.history
            self.copied.add(move.target)
            sequence.id = move.target
            bisect.insort(self.active, sequence, key=_by_id)

    def release(self, sequence: Sequence, keep: bool = True) -> None:
        """Free the slot; its KV cells stay for a request with the same prefix unless `keep` is False.

        A fork that ended on its first token never had a slot: only its samplers go.
        """
        sequence.free_samplers()
        if sequence.id < 0:
            return
        if not keep:
            self._model().clear(sequence.id)
            self.resident[sequence.id] = []
        self._leave(sequence)

    def _join(self, sequence: Sequence) -> None:
        bisect.insort(self.active, sequence, key=_by_id)
        if sequence.prefilled < len(sequence.prompt):
            self.prompting.append(sequence)

    def _leave(self, sequence: Sequence) -> None:
        self.active.remove(sequence)
        if sequence.prefilled < len(sequence.prompt):
            self.prompting.remove(sequence)
        self.free_ids.append(sequence.id)


def _by_id(sequence: Sequence) -> int:
    return sequence.id

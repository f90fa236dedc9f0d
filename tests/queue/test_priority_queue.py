from app.queue.priority_queue import PriorityQueue


class Item:
    def __init__(self, name: str) -> None:
        self.name = name
        self.waiting_in: object | None = None
        self.waiting_level: object | None = None
        self.turn_key: object = None

    def __repr__(self) -> str:
        return self.name


def names(items: list[Item | None]) -> list[str | None]:
    return [i.name if i is not None else None for i in items]


def test_lower_rank_first_and_fifo_within_rank() -> None:
    q: PriorityQueue[Item] = PriorityQueue(levels=3)
    for name, rank in [("low1", 2), ("norm1", 1), ("high1", 0), ("low2", 2), ("high2", 0), ("norm2", 1)]:
        q.push(Item(name), rank)
    assert names([q.pop() for _ in range(7)]) == ["high1", "high2", "norm1", "norm2", "low1", "low2", None]


def test_remove_counts_and_positions() -> None:
    q: PriorityQueue[Item] = PriorityQueue(levels=3)
    a, b, c = Item("a"), Item("b"), Item("c")
    q.push(a, 1)
    q.push(b, 1)
    q.push(c, 0)
    assert (q.position(c, 0), q.position(a, 1), q.position(b, 1)) == (1, 2, 3)
    assert q.remove(a, 1)
    assert not q.remove(a, 1)
    assert len(q) == 2 and q.count(1) == 1 and q.count(0) == 1
    assert q.position(b, 1) == 2 and q.position(a, 1) is None
    assert names([q.pop(), q.pop(), q.pop()]) == ["c", "b", None]


def test_an_item_of_another_queue_is_not_removed() -> None:
    first: PriorityQueue[Item] = PriorityQueue(levels=3)
    second: PriorityQueue[Item] = PriorityQueue(levels=3)
    x, y = Item("x"), Item("y")
    first.push(x, 2)
    second.push(y, 2)
    assert not second.remove(x, 2)
    assert second.count(2) == 1 and first.count(2) == 1


def test_a_removed_then_requeued_item_appears_once_at_its_new_place() -> None:
    q: PriorityQueue[Item] = PriorityQueue(levels=3)
    a, b = Item("a"), Item("b")
    q.push(a, 2)
    q.push(b, 1)
    q.remove(a, 2)
    q.push(a, 1)  # as aging would: same queue, higher level, behind b
    assert names([q.pop(), q.pop(), q.pop()]) == ["b", "a", None]
    assert len(q) == 0


def test_an_item_requeued_at_the_level_it_was_removed_from_waits_at_the_back_once() -> None:
    q: PriorityQueue[Item] = PriorityQueue(levels=3)
    a, b, c = Item("a"), Item("b"), Item("c")
    for item in (a, b, c):
        q.push(item, 1)
    q.remove(a, 1)
    q.push(a, 1)  # its dead entry at the front must not give it back its old place
    assert names([q.pop(), q.pop(), q.pop(), q.pop()]) == ["b", "c", "a", None]
    assert len(q) == 0


def test_mass_removal_compacts_and_keeps_order() -> None:
    q: PriorityQueue[Item] = PriorityQueue(levels=3)
    items = [Item(str(i)) for i in range(1000)]
    for i, item in enumerate(items):
        q.push(item, i % 3)
    removed = set(range(0, 1000, 3)) | set(range(1, 1000, 3))
    for i in sorted(removed):
        q.remove(items[i], i % 3)
    assert len(q) == 1000 - len(removed)
    held = sum(len(entries) for level in q._levels for entries in level.queues.values())
    assert held < 1000  # compacted rather than left to grow
    expected = sorted(set(range(1000)) - removed, key=lambda i: (i % 3, i))
    assert [int(q.pop().name) for _ in range(len(expected))] == expected  # type: ignore[union-attr]
    assert len(q) == 0


def test_keys_take_turns_within_a_level_and_keep_their_own_order() -> None:
    q: PriorityQueue[Item] = PriorityQueue(levels=3)
    for i in range(5):
        q.push(Item(f"noisy{i}"), 1, "noisy")
    q.push(Item("quiet0"), 1, "quiet")
    q.push(Item("other0"), 1, "other")
    q.push(Item("quiet1"), 1, "quiet")
    q.push(Item("urgent"), 0, "noisy")
    expected = ["urgent", "noisy0", "quiet0", "other0", "noisy1", "quiet1", "noisy2", "noisy3", "noisy4"]
    assert names([q.pop() for _ in range(len(expected))]) == expected
    assert q.pop() is None and len(q) == 0


def test_positions_count_the_turns_of_other_keys() -> None:
    q: PriorityQueue[Item] = PriorityQueue(levels=3)
    noisy = [Item(f"n{i}") for i in range(100)]
    for item in noisy:
        q.push(item, 1, "noisy")
    quiet = Item("quiet")
    q.push(quiet, 1, "quiet")
    high = Item("high")
    q.push(high, 0, "noisy")
    assert q.position(high, 0) == 1
    assert q.position(quiet, 1) == 3  # behind the high one and one noisy turn, not behind 100 noisy requests
    assert q.position(noisy[2], 1) == 5  # n0, quiet, n1 ... after the high one
    popped = [q.pop() for _ in range(3)]
    assert names(popped) == ["high", "n0", "quiet"]


def test_peek_is_what_pop_returns_and_skips_removed_items() -> None:
    q: PriorityQueue[Item] = PriorityQueue(levels=3)
    a, b, c = Item("a"), Item("b"), Item("c")
    q.push(a, 2, "x")
    q.push(b, 2, "y")
    q.push(c, 2, "x")
    q.remove(a, 2)
    # x keeps its turn with its next request
    assert q.peek() is c and q.peek() is c
    assert q.pop() is c and q.peek() is b and q.pop() is b and q.peek() is None

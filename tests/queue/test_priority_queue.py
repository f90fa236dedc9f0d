from app.queue.priority_queue import PriorityQueue


def test_lower_rank_first_and_fifo_within_rank() -> None:
    q: PriorityQueue[str] = PriorityQueue(levels=3)
    for name, rank in [("low1", 2), ("norm1", 1), ("high1", 0), ("low2", 2), ("high2", 0), ("norm2", 1)]:
        q.push(name, rank)
    assert [q.pop() for _ in range(6)] == ["high1", "high2", "norm1", "norm2", "low1", "low2"]
    assert q.pop() is None


def test_remove_counts_and_positions() -> None:
    q: PriorityQueue[str] = PriorityQueue(levels=3)
    a = q.push("a", 1)
    b = q.push("b", 1)
    c = q.push("c", 0)
    assert (q.position(c), q.position(a), q.position(b)) == (1, 2, 3)
    assert q.remove(a)
    assert not q.remove(a)
    assert len(q) == 2 and q.count(1) == 1 and q.count(0) == 1
    assert q.position(b) == 2 and q.position(a) is None
    assert q.peek_rank() == 0
    assert [q.pop(), q.pop(), q.pop()] == ["c", "b", None]


def test_entry_of_another_queue_is_not_removed() -> None:
    first: PriorityQueue[str] = PriorityQueue(levels=3)
    second: PriorityQueue[str] = PriorityQueue(levels=3)
    entry = first.push("x", 2)
    second.push("y", 2)
    assert not second.remove(entry)
    assert second.count(2) == 1 and first.count(2) == 1


def test_mass_removal_compacts_and_keeps_order() -> None:
    q: PriorityQueue[int] = PriorityQueue(levels=3)
    entries = [q.push(i, i % 3) for i in range(1000)]
    removed = set(range(0, 1000, 3)) | set(range(1, 1000, 3))
    for i in sorted(removed):
        q.remove(entries[i])
    assert len(q) == 1000 - len(removed)
    assert len(q._heap) < 1000  # compacted once the dead outnumbered the live, rather than left to grow
    expected = sorted(set(range(1000)) - removed, key=lambda i: (i % 3, i))
    assert [q.pop() for _ in range(len(expected))] == expected
    assert len(q) == 0

import random

from worker import batching


def test_every_index_is_planned_once_longest_first() -> None:
    lengths = [random.Random(7).randint(1, 300) for _ in range(500)]
    plan = batching.plan(lengths, max_items=32, max_tokens=4096)
    flat = [i for batch in plan for i in batch]
    assert sorted(flat) == list(range(500))
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)


def test_micro_batches_respect_count_and_padded_token_budget() -> None:
    lengths = [10] * 100 + [200] * 10
    plan = batching.plan(lengths, max_items=16, max_tokens=1000)
    for batch in plan:
        assert len(batch) <= 16
        assert len(batch) * max(lengths[i] for i in batch) <= 1000
    # 200-token texts fit five to a batch; 10-token ones are capped by the count.
    assert [len(b) for b in plan] == [5, 5] + [16] * 6 + [4]


def test_a_text_longer_than_the_budget_runs_alone() -> None:
    assert batching.plan([50, 5000, 50], max_items=8, max_tokens=1000) == [[1], [0, 2]]

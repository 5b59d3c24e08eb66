"""The dry run's probe sample: drawn evenly from every text offered, not the first ones."""

from __future__ import annotations

from tasks.backfill.probe import Sample


def test_the_sample_is_drawn_from_the_whole_stream_and_is_the_same_each_time() -> None:
    first, again = Sample(size=100), Sample(size=100)
    for start in range(0, 10_000, 250):  # offered a chunk at a time, as a dry run does
        chunk = [str(i) for i in range(start, start + 250)]
        first.offer(chunk)
        again.offer(chunk)
    drawn = sorted(int(text) for text in first.texts)
    assert len(drawn) == len(set(drawn)) == 100 and first.seen == 10_000
    assert drawn[0] < 1_000 and drawn[-1] > 9_000  # from the start and from the end
    assert sum(i >= 5_000 for i in drawn) > 30  # not the first texts alone
    assert first.texts == again.texts


def test_fewer_texts_than_the_sample_are_all_kept() -> None:
    sample = Sample(size=100)
    sample.offer(["a", "b"])
    assert sample.texts == ["a", "b"]

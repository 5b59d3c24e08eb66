"""How much one key may ask of /v1/embeddings at once (tasks.api.admission)."""

from __future__ import annotations

import pytest

from tasks import names
from tasks.api.admission import Admission, check_count, priority_for
from tasks.api.errors import ApiError


def test_a_request_over_the_input_cap_is_a_400_naming_input() -> None:
    check_count(2048, 2048)
    with pytest.raises(ApiError) as refused:
        check_count(100_000, 2048)
    assert (refused.value.status, refused.value.param) == (400, "input")
    assert refused.value.code == "too_many_inputs"
    assert "100000 texts, over the limit of 2048" in refused.value.message


def test_a_key_past_its_waiting_texts_is_a_429_and_others_are_let_in() -> None:
    admission = Admission(max_waiting=3000, batch_texts=128)
    with admission.admit("a", 2048):
        with pytest.raises(ApiError) as held, admission.admit("a", 2048):
            pass
        assert (held.value.status, held.value.code) == (429, "too_many_waiting")
        assert held.value.headers == {"Retry-After": "1"}
        with admission.admit("a", 100):  # still under the limit: in
            assert admission.waiting("a") == 2148
        with admission.admit("b", 1):  # another key is not held by a's texts
            assert admission.waiting("b") == 1
    assert admission.waiting("a") == 0 and admission.waiting("b") == 0


def test_a_key_with_nothing_waiting_is_let_in_whatever_its_size() -> None:
    admission = Admission(max_waiting=10, batch_texts=128)
    with admission.admit("a", 2048):
        assert admission.waiting("a") == 2048


def test_texts_stop_waiting_when_their_request_fails() -> None:
    admission = Admission(max_waiting=100, batch_texts=128)
    with pytest.raises(RuntimeError), admission.admit("a", 50):
        raise RuntimeError("the store is away")
    assert admission.waiting("a") == 0


def test_a_request_s_priority_falls_as_its_key_s_texts_ahead_grow() -> None:
    steps = [priority_for(n, 128) for n in (1, 128, 129, 512, 513, 2048, 2049, 8192)]
    assert steps == [names.FIRST, names.FIRST, 3, 3, 6, 6, names.LAST, names.LAST]
    admission = Admission(max_waiting=10_000, batch_texts=128)
    with (
        admission.admit("a", 2048) as heavy,
        admission.admit("a", 1) as behind,
        admission.admit("b", 1) as light,  # another key's one text goes first
    ):
        assert (heavy, behind, light) == (6, names.LAST, names.FIRST)

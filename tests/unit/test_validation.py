import pytest

from worker.errors import InputError
from worker.validation import validate


@pytest.mark.parametrize(
    ("texts", "message"),
    [
        ([], "texts is empty"),
        (["ok", ""], "index 1 are empty or whitespace only"),
        (["ok", " \n\t "], "index 1 are empty or whitespace only"),
        (["ok", 3, None], "index 1, 2 are not strings (NoneType, int)"),
        ("a plain string", "must be a list of strings, got str"),
        (None, "must be a list of strings, got NoneType"),
        (["x"] * 11, "11 texts is more than the batch limit of 10"),
    ],
)
def test_unusable_batches_are_refused_with_a_clear_message(texts: object, message: str) -> None:
    with pytest.raises(InputError) as raised:
        validate(texts, max_items=10)  # type: ignore[arg-type]
    assert message in str(raised.value)


def test_a_good_batch_passes_unchanged() -> None:
    assert validate(("a", "b c"), max_items=2) == ["a", "b c"]


def test_many_bad_items_are_summarised() -> None:
    with pytest.raises(InputError, match=r"index 0, 1, 2, 3, 4 and 3 more"):
        validate([""] * 8, max_items=10)

"""What a failure is (``tasks.failures``), decided once: worth another try or not, its kind when
it ends items, the wait before the next try, and the line that says why. Both judgements walk
an error's causes but stop at the first of embedq's own errors, which says what it is."""

from __future__ import annotations

import pytest
import redis.exceptions
from billiard.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded, WorkerLostError
from kombu.exceptions import OperationalError as BrokerError
from pydantic import ValidationError
from sqlalchemy import exc as sql

from storage.models import FailureKind
from tasks import failures
from tasks.message import BatchMessage
from tasks.preparation import ModelPendingError
from worker.errors import (
    EmbedqError,
    InputError,
    ModelError,
    ModelNotFoundError,
    ProviderError,
    SourceUnavailableError,
    TextsRefusedError,
    UnavailableError,
)
from worker.settings import Settings


def raised_from(error: BaseException, cause: BaseException) -> BaseException:
    """``error`` as ``raise error from cause`` leaves it."""
    try:
        try:
            raise cause
        except BaseException as inner:
            raise error from inner
    except BaseException as outer:
        return outer


def locked() -> sql.OperationalError:
    return sql.OperationalError("UPDATE batches ...", {}, Exception("database is locked"))


def validation_error() -> ValidationError:
    try:
        BatchMessage.model_validate({"job_id": "j"})
    except ValidationError as exc:
        return exc
    raise AssertionError("a message without texts validated")


CASES = [
    # (the error, transient, kind)
    pytest.param(
        raised_from(ModelError("not prepared within the time limit"), SoftTimeLimitExceeded()),
        False,
        FailureKind.MODEL,
        id="model-error-from-soft-time-limit",
    ),
    pytest.param(SoftTimeLimitExceeded(), True, FailureKind.WORKER, id="bare-soft-time-limit"),
    pytest.param(TimeLimitExceeded(600), False, FailureKind.WORKER, id="hard-time-limit"),
    pytest.param(WorkerLostError("died"), False, FailureKind.WORKER, id="worker-lost"),
    pytest.param(locked(), True, FailureKind.UNAVAILABLE, id="sqlalchemy-operational"),
    pytest.param(
        sql.InterfaceError("SELECT 1", {}, Exception("closed")),
        True,
        FailureKind.UNAVAILABLE,
        id="sqlalchemy-interface",
    ),
    pytest.param(
        redis.exceptions.ConnectionError("refused"),
        True,
        FailureKind.UNAVAILABLE,
        id="redis-connection",
    ),
    pytest.param(BrokerError("no route"), True, FailureKind.UNAVAILABLE, id="kombu-operational"),
    pytest.param(ConnectionRefusedError(111, "refused"), True, FailureKind.UNAVAILABLE, id="os"),
    pytest.param(validation_error(), False, FailureKind.INPUT, id="pydantic-validation"),
    pytest.param(InputError("texts is empty"), False, FailureKind.INPUT, id="input"),
    pytest.param(
        TextsRefusedError((1,), "nothing to read"), False, FailureKind.INPUT, id="texts-refused"
    ),
    pytest.param(ModelNotFoundError("no such model"), False, FailureKind.MODEL, id="no-model"),
    pytest.param(ProviderError("no CUDA"), False, FailureKind.MODEL, id="provider"),
    pytest.param(UnavailableError("broker"), True, FailureKind.UNAVAILABLE, id="unavailable"),
    pytest.param(SourceUnavailableError("hub"), True, FailureKind.UNAVAILABLE, id="source"),
    pytest.param(ModelPendingError("m", "h"), True, FailureKind.UNAVAILABLE, id="model-pending"),
    pytest.param(EmbedqError("cannot be served"), False, FailureKind.INPUT, id="embedq-own"),
    pytest.param(ValueError("a bug"), False, FailureKind.INTERNAL, id="value-error"),
    pytest.param(KeyError("a bug"), False, FailureKind.INTERNAL, id="key-error"),
]


@pytest.mark.parametrize(("error", "transient", "kind"), CASES)
def test_each_error_is_judged_transient_or_final_and_given_its_kind(
    error: BaseException, transient: bool, kind: FailureKind
) -> None:
    assert failures.is_transient(error) is transient
    assert failures.classify(error) == kind


def test_a_wrapped_error_is_judged_by_what_it_was_raised_from() -> None:
    wrapped = raised_from(RuntimeError("while storing the batch"), locked())
    assert failures.is_transient(wrapped) is True
    assert failures.classify(wrapped) == FailureKind.UNAVAILABLE
    lost = raised_from(ValueError("while claiming"), WorkerLostError("died"))
    assert (failures.is_transient(lost), failures.classify(lost)) == (False, FailureKind.WORKER)


def test_the_walk_stops_at_the_first_of_embedq_s_own_errors() -> None:
    """An error raised on purpose says what it is, whatever it was raised from."""
    refused = raised_from(InputError("id at index 0 holds a NUL"), locked())
    assert (failures.is_transient(refused), failures.classify(refused)) == (
        False,
        FailureKind.INPUT,
    )
    away = raised_from(UnavailableError("the broker cannot be reached"), ValueError("x"))
    assert (failures.is_transient(away), failures.classify(away)) == (True, FailureKind.UNAVAILABLE)
    # Below the first own error, nothing counts: its own cause is not looked at.
    deep = raised_from(RuntimeError("outer"), raised_from(ModelError("bad file"), locked()))
    assert (failures.is_transient(deep), failures.classify(deep)) == (False, FailureKind.MODEL)


def test_the_backoff_doubles_with_equal_jitter_up_to_its_caps() -> None:
    settings = Settings(retry_backoff_max=10, visibility_timeout=3600)
    for tries, delay in [(0, 1.0), (1, 2.0), (3, 8.0), (4, 10.0), (20, 10.0)]:
        waits = [failures.backoff(tries, settings) for _ in range(50)]
        assert all(delay / 2 <= wait <= delay for wait in waits), (tries, waits)
    # Never past half the visibility timeout, or Redis hands the waiting message out again.
    short = Settings(retry_backoff_max=1000, visibility_timeout=8)
    assert all(2.0 <= failures.backoff(10, short) <= 4.0 for _ in range(50))


def test_a_reason_is_the_class_and_the_first_line_of_the_message() -> None:
    assert failures.describe(ValueError("bad value\nmore detail")) == "ValueError: bad value"
    assert failures.describe(WorkerLostError()) == "WorkerLostError"
    long = failures.describe(InputError("x" * 600))
    assert long == "InputError: " + "x" * 500 + "..."

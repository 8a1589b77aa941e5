"""The one retry policy: delays, cap, transient window and delivery bounds (plain functions, no stack)."""

from __future__ import annotations

from pymongo.errors import AutoReconnect, ServerSelectionTimeoutError

from core.errors import InvalidInputError, StorageUnavailableError, TransientError
from core.settings import Settings
from events.streams import CONSUMERS, TUNING_REQUESTED, RetryPolicy
from handlers.common import unreachable


def test_delays_are_capped_and_the_last_repeats() -> None:
    p = RetryPolicy(delays_s=(1.0, 5.0, 15.0), cap_s=10.0, transient_window_s=30.0)
    assert [p.delay(n) for n in range(1, 6)] == [1.0, 5.0, 10.0, 10.0, 10.0]
    assert p.waited(1) == 0 and p.waited(4) == 16.0


def test_the_window_sets_the_consumers_max_deliver() -> None:
    p = RetryPolicy(delays_s=(1.0, 5.0), cap_s=2.0, transient_window_s=30.0, attempts=5)
    n = p.window_deliveries()
    assert p.waited(n) >= 30.0 > p.waited(n - 1)  # the first delivery at which the window is spent
    assert p.max_deliver() == n == 17  # 1 + 2 * 15 s of delays
    assert all(c.config(p).max_deliver >= n for c in CONSUMERS)  # JetStream never ends the window early
    assert RetryPolicy(transient_window_s=0, attempts=5).max_deliver() == 5
    assert TUNING_REQUESTED.config(RetryPolicy(transient_window_s=0)).max_deliver == 6  # its own attempts


def test_the_default_window_is_at_least_ten_minutes_and_comes_from_settings() -> None:
    s = Settings(_env_file=None)
    p = RetryPolicy.from_settings(s)
    assert p.transient_window_s >= 600 and p == RetryPolicy()
    custom = Settings(_env_file=None, retry_delays_s=(2.0,), retry_cap_s=1.0, retry_window_s=5.0, retry_attempts=3)
    assert RetryPolicy.from_settings(custom) == RetryPolicy(delays_s=(2.0,), cap_s=1.0, transient_window_s=5.0,
                                                            attempts=3)


def test_only_an_unreachable_store_counts_as_transient() -> None:
    assert unreachable(StorageUnavailableError("S3 unreachable: MaxRetryError"))
    assert unreachable(ServerSelectionTimeoutError("no servers"))
    assert unreachable(AutoReconnect("connection reset"))
    assert unreachable(ConnectionRefusedError())
    try:  # a checkpoint upload that failed because S3 was down, wrapped by the trainer
        try:
            raise StorageUnavailableError("S3 unreachable")
        except StorageUnavailableError as e:
            raise TransientError("checkpoint upload failed") from e
    except TransientError as wrapped:
        assert unreachable(wrapped)
    assert not unreachable(TransientError("dataset object not found yet"))
    assert not unreachable(InvalidInputError("bad"))
    assert not unreachable(ValueError("a bug"))

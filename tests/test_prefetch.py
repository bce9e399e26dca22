"""prefetched: order kept, worker errors raised in the consumer, an early exit stops the worker."""

from __future__ import annotations

import threading
import time

import pytest

from converters.reading.prefetch import prefetched


def test_yields_every_item_in_order() -> None:
    assert list(prefetched(range(100), depth=3)) == list(range(100))


def test_a_worker_error_reaches_the_consumer_after_the_items_before_it() -> None:
    def failing():
        yield 1
        yield 2
        raise ValueError("broken slice")

    seen = []
    with pytest.raises(ValueError, match="broken slice"):
        for item in prefetched(failing()):
            seen.append(item)
    assert seen == [1, 2]


def test_leaving_early_stops_the_worker() -> None:
    produced = []

    def endless():
        count = 0
        while True:
            produced.append(count)
            yield count
            count += 1

    stream = prefetched(endless(), depth=2)
    assert next(stream) == 0
    stream.close()
    settled = len(produced)
    time.sleep(0.2)
    assert len(produced) == settled <= 4
    assert not any(thread.name == "prefetch" for thread in threading.enumerate())

"""The suite's client deadline: a hang fails the test quickly instead of stalling the run."""

from __future__ import annotations

import time
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred

from tests.support import Cleanup, DeadlineExceeded, deadline, http_client, start_mock, wait_for

CHAT = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": true}'


def deadline_timers() -> list[Any]:
    return [
        c for c in reactor.getDelayedCalls()
        if getattr(c.func, "__module__", "").startswith("tests.support")
    ]


@pytest_twisted.ensureDeferred
async def test_an_answer_that_never_comes_fails_at_the_deadline(cleanup: Cleanup) -> None:
    mock = start_mock("a", fail="hang")
    cleanup.append(mock)
    began = time.monotonic()
    with pytest.raises(DeadlineExceeded, match=r"POST .*/v1/chat/completions: nothing within"):
        await http_client(seconds=0.3).post(mock.url + "/v1/chat/completions", data=CHAT)
    assert time.monotonic() - began < 5
    # The request was cancelled: the backend saw its client leave.
    await wait_for(lambda: mock.stats()["disconnects"] == 1, what="the client leaving")


@pytest_twisted.ensureDeferred
async def test_a_body_that_never_ends_fails_at_the_deadline(cleanup: Cleanup) -> None:
    mock = start_mock("a", fail="endless", stream_delay_ms=20)
    cleanup.append(mock)
    response = await http_client(seconds=0.3).post(mock.url + "/v1/chat/completions", data=CHAT)
    assert response.code == 200
    began = time.monotonic()
    with pytest.raises(DeadlineExceeded, match=r"body not complete within 0\.3 s"):
        await response.content()
    assert time.monotonic() - began < 5
    await wait_for(lambda: mock.stats()["disconnects"] == 1, what="the connection closed")


@pytest_twisted.ensureDeferred
async def test_answers_in_time_pass_unchanged_and_leave_no_timer(cleanup: Cleanup) -> None:
    mock = start_mock("a")
    cleanup.append(mock)
    response = await http_client().post(mock.url + "/v1/chat/completions", data=CHAT)
    assert response.code == 200
    body = await response.content()
    assert body.endswith(b"data: [DONE]\n\n")
    assert deadline_timers() == []


@pytest_twisted.ensureDeferred
async def test_deadline_on_a_coroutine_cancels_what_it_awaits() -> None:
    cancelled: list[bool] = []
    never: Deferred[None] = Deferred(lambda _: cancelled.append(True))

    async def work() -> None:
        await never

    with pytest.raises(DeadlineExceeded, match=r"the work: nothing within 0\.1 s"):
        await deadline(work(), 0.1, what="the work")
    assert cancelled == [True]

"""Following an agent's event stream inside a job.

Invariants
- Progress events become the job's ``bytes_done``/``bytes_total``; ``bytes_sent`` is what
  the appliance's own session counted (not what the agent claims), reported as it grows.
- The job's cancellation is checked at every event; a cancel closes the stream, which tells
  the agent to stop.
- ``log`` events (text) go to the job's log.
- A stream that ends without a ``done`` event is a failure: the agent died or the
  connection broke mid-way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import closing
from typing import Any

from tandem.errors import RemoteError
from tandem.jobs.runner import JobContext


def follow(
    ctx: JobContext,
    events: Iterator[dict[str, Any]],
    *,
    host: str,
    moved: Callable[[], int],
) -> dict[str, Any]:
    """Consume ``events`` into the job's progress; return the ``done`` event.

    ``moved()`` is the number of bytes the session has moved so far.
    """
    reported = 0
    done: dict[str, Any] | None = None

    def account() -> None:
        nonlocal reported
        now = moved()
        if now > reported:
            ctx.add_sent(now - reported)
            reported = now

    with closing(events) as stream:  # type: ignore[type-var]  # a generator has close()
        for event in stream:
            kind = event.get("event")
            if kind == "progress":
                total = int(event.get("total") or 0)
                ctx.progress(int(event.get("done") or 0), total or None)
            elif kind == "done":
                done = event
            elif kind == "log" and isinstance(event.get("text"), str):
                ctx.log(event["text"][:2000])  # what the agent did on the way (a VM's power)
            account()
            ctx.check_canceled()
    account()
    if done is None:
        raise RemoteError(
            what="host", name=host, detail="its agent ended the transfer without a result"
        )
    return done

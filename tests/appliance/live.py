"""Daemons in-process for tests: an appliance or agent app served by uvicorn in a thread.

Real HTTPS on a loopback port (the certificate made at ``init``), so agents and appliances
reach each other exactly as in production, without subprocesses.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import TracebackType

import uvicorn
from fastapi import FastAPI

from tandem.transport.server import free_port

__all__ = ["LiveServer", "free_port"]


class LiveServer:
    """``with LiveServer(app, directory, port):`` serves ``app`` until the block ends."""

    def __init__(self, app: FastAPI, directory: Path, port: int) -> None:
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            ssl_certfile=str(directory / "cert.pem"),
            ssl_keyfile=str(directory / "key.pem"),
            log_level="warning",
            lifespan="off",
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name=f"live-{port}", daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the live server did not start")
            time.sleep(0.02)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.server.should_exit = True
        self.thread.join(10)

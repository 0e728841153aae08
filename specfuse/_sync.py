"""Blocking entry points over the async core.

The sync API must work when its caller already runs an event loop (Jupyter,
FastAPI handlers, LangChain's sync callbacks): `asyncio.run` would fail there.
So every blocking call runs its coroutine on a private loop in a daemon
thread, owned by one model object and reused across calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


class LoopThread:
    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _ensure(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None or not self._loop.is_running():
                loop = asyncio.new_event_loop()
                ready = threading.Event()

                def serve() -> None:
                    asyncio.set_event_loop(loop)
                    loop.call_soon(ready.set)
                    loop.run_forever()

                self._thread = threading.Thread(target=serve, name="specfuse-loop", daemon=True)
                self._thread.start()
                ready.wait()
                self._loop = loop
            return self._loop

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run coro on the private loop and wait for it; Ctrl-C cancels it."""
        loop = self._ensure()
        if _running_loop() is loop:
            coro.close()
            raise RuntimeError("a blocking specfuse call was made from its own event loop thread")
        future = asyncio.run_coroutine_threadsafe(coro, loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            with contextlib.suppress(BaseException):
                future.result(timeout=5)
            raise

    def iterate(self, make: Callable[[], AsyncIterator[T]]) -> Iterator[T]:
        """Drive an async iterator; closing the sync iterator early cancels it."""
        agen = make()

        async def step() -> tuple[bool, T | None]:
            try:
                return True, await agen.__anext__()
            except StopAsyncIteration:
                return False, None

        async def close() -> None:
            aclose = getattr(agen, "aclose", None)
            if aclose is not None:
                await aclose()

        try:
            while True:
                ok, item = self.run(step())
                if not ok:
                    return
                yield item  # type: ignore[misc]
        finally:
            self.run(close())

    def stop(self) -> None:
        with self._lock:
            if self._loop is not None and self._loop.is_running():
                self._loop.call_soon_threadsafe(self._loop.stop)
                if self._thread is not None:
                    self._thread.join(timeout=5)
            self._loop = None
            self._thread = None


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None

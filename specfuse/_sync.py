"""Blocking entry points over the async core.

The sync API must work when its caller already runs an event loop (Jupyter,
FastAPI handlers, LangChain's sync callbacks): `asyncio.run` would fail there.
So every blocking call runs its coroutine on a private loop in a daemon
thread, owned by one model object and reused across calls.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

#: Seconds a cancelled call may take to unwind before the caller gets its exception anyway.
_UNWIND_LIMIT = 10.0


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
        """Run coro on the private loop and wait for it; Ctrl-C cancels it.

        On Ctrl-C (or any other exception in the waiting thread) the coroutine is
        cancelled and waited for until it has unwound, so that its cleanup (a
        stream's `aclose`, the members' release) has run before the exception
        reaches the caller.
        """
        try:
            loop = self._ensure()
        except BaseException:
            coro.close()
            raise
        if _running_loop() is loop:
            coro.close()
            raise RuntimeError("a blocking specfuse call was made from its own event loop thread")
        finished = threading.Event()
        box: dict[str, asyncio.Task[T]] = {}

        def start() -> None:
            task = loop.create_task(coro)
            task.add_done_callback(lambda _: finished.set())
            box["task"] = task

        def cancel() -> None:
            # Callbacks run in the order they were scheduled: if start() was
            # scheduled at all, it has run and the task exists.
            task = box.get("task")
            if task is None:
                finished.set()
            else:
                task.cancel()

        # A Task of our own rather than run_coroutine_threadsafe: cancelling that
        # concurrent future reports "done" at once while the coroutine is still
        # unwinding on the loop, and the caller's next call (a stream's aclose())
        # would then run into it.
        try:
            loop.call_soon_threadsafe(start)
            finished.wait()
        except BaseException:
            loop.call_soon_threadsafe(cancel)
            finished.wait(timeout=_UNWIND_LIMIT)
            task = box.get("task")
            if task is None:
                coro.close()  # interrupted before it was scheduled: it never ran
            elif task.done():
                _retrieve(task)
            raise
        return box["task"].result()

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


def _retrieve(task: asyncio.Task[Any]) -> None:
    """Mark a finished task's outcome as seen, so asyncio logs no "never retrieved" error:
    the caller is already raising its own exception (Ctrl-C)."""
    if not task.cancelled():
        task.exception()


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None

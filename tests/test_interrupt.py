"""Ctrl-C in the middle of a stream, sent for real: SIGINT to a subprocess.

The command line must stop promptly, print no traceback and exit 130; a Python
loop over `SpecFuse.stream` must get KeyboardInterrupt (not a RuntimeError from
the async generator underneath) with the model object still usable. Time to
exit is measured by benchmarks/ctrl_c.py, not asserted here: the bounds below
only keep a hang from blocking the suite.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: Generous: a hang fails the test instead of blocking the suite; no speed is asserted.
HANG_LIMIT = 120.0


def _ctrl_c_as_at_a_terminal() -> None:
    """Let the child see SIGINT whatever started the suite.

    A runner started in the background (`cmd &` in a script, nohup) ignores SIGINT,
    children inherit that, and Python then installs no KeyboardInterrupt handler:
    Ctrl-C would never reach the code under test.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Child:
    """A subprocess whose stdout and stderr are collected as they arrive."""

    def __init__(self, args: list[str]) -> None:
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "NO_COLOR": "1",
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        }
        self.proc = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=ROOT,
            preexec_fn=_ctrl_c_as_at_a_terminal,
        )
        self.out = bytearray()
        self.err = bytearray()
        self._readers = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, self.out), daemon=True),
            threading.Thread(target=self._pump, args=(self.proc.stderr, self.err), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _pump(stream: object, into: bytearray) -> None:
        while chunk := stream.read1(4096):  # type: ignore[attr-defined]
            into.extend(chunk)

    def wait_for(self, predicate: object, limit: float = HANG_LIMIT * 5) -> None:
        deadline = time.monotonic() + limit
        while not predicate():  # type: ignore[operator]
            if self.proc.poll() is not None:
                raise AssertionError(f"the child ended early ({self.proc.returncode}): {self.stderr}")
            if time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"the child never got there: {self.stderr}")
            time.sleep(0.05)

    def interrupt(self) -> tuple[int, float]:
        """Send SIGINT; return the exit status and the seconds it took to exit."""
        sent = time.monotonic()
        self.proc.send_signal(signal.SIGINT)
        try:
            code = self.proc.wait(timeout=HANG_LIMIT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"still running {HANG_LIMIT} s after Ctrl-C: {self.stderr}") from None
        took = time.monotonic() - sent
        for reader in self._readers:
            reader.join(timeout=5)
        return code, took

    @property
    def stdout(self) -> str:
        return self.out.decode(errors="replace")

    @property
    def stderr(self) -> str:
        return self.err.decode(errors="replace")


def test_ctrl_c_while_a_call_unwinds_raises_keyboard_interrupt_after_its_cleanup() -> None:
    """The race itself, made certain: cancelling a step takes a moment to unwind (as a
    local model finishing its token does), and the stream must not be closed before."""
    script = textwrap.dedent(
        """
        import asyncio, os, signal
        from specfuse._sync import LoopThread

        async def numbers():
            try:
                n = 0
                while True:
                    n += 1
                    if n == 3:
                        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the step is awaited
                    await asyncio.sleep(0.2)
                    yield n
            except asyncio.CancelledError:
                await asyncio.shield(asyncio.sleep(0.5))  # cleanup that takes a while
                print("unwound", flush=True)
                raise

        try:
            for n in LoopThread().iterate(numbers):
                print("item", n, flush=True)
        except KeyboardInterrupt:
            print("KeyboardInterrupt", flush=True)
        """
    )
    child = Child([sys.executable, "-c", script])
    code = child.proc.wait(timeout=HANG_LIMIT)
    for reader in child._readers:
        reader.join(timeout=5)
    assert code == 0, child.stderr
    assert child.stdout.split() == ["item", "1", "item", "2", "unwound", "KeyboardInterrupt"]
    assert "Traceback" not in child.stderr and "RuntimeError" not in child.stderr, child.stderr


def test_ctrl_c_in_a_python_loop_over_stream_raises_keyboard_interrupt_and_frees_the_members() -> None:
    script = textwrap.dedent(
        """
        import sys
        from specfuse import SpecFuse
        from tests.conftest import pair_config

        fuse = SpecFuse(pair_config(max_tokens=300, segment_tokens=2, gate_tokens=2))
        fuse.start()
        try:
            for segment in fuse.stream("Count from one to one hundred in words."):
                print("segment", flush=True)
        except KeyboardInterrupt:
            print("KeyboardInterrupt", flush=True)
        # The members were freed: the same object answers the next request.
        result = fuse.generate("Name a colour.", max_tokens=4)
        print("after", result.finish_reason, result.trace.finish_reason, flush=True)
        """
    )
    child = Child([sys.executable, "-c", script])
    child.wait_for(lambda: child.stdout.count("segment") >= 2)
    code, took = child.interrupt()
    assert code == 0, child.stderr
    lines = child.stdout.split("\n")
    assert "KeyboardInterrupt" in lines, child.stdout
    after = next(line for line in lines if line.startswith("after"))
    assert after.split()[1] == after.split()[2] in {"stop", "length"}
    assert "Traceback" not in child.stderr and "RuntimeError" not in child.stderr, child.stderr
    print(f"python loop: exited {took:.2f} s after SIGINT (including one 4-token generation)")


def test_ctrl_c_mid_stream_in_the_cli_exits_130_without_a_traceback() -> None:
    child = Child(
        [
            sys.executable,
            "-m",
            "specfuse.cli",
            "generate",
            "Count from one to one hundred in words.",
            *("-m", "smollm2-135m", "-m", "gemma3-270m"),
            *("--max-tokens", "300", "--segment-tokens", "2", "--gate-tokens", "2", "--temperature", "0"),
        ]
    )
    child.wait_for(lambda: "members:" in child.stderr and len(child.stdout.strip()) >= 8)
    code, took = child.interrupt()
    assert code == 130, child.stderr
    assert "Traceback" not in child.stderr, child.stderr
    assert child.stderr.rstrip().endswith("interrupted"), child.stderr
    assert "fusion summary" not in child.stderr  # it stopped; it did not finish the answer
    print(f"cli: exit {code} {took:.2f} s after SIGINT")

"""Ctrl-C in the middle of `specfuse generate`, typed into a real terminal.

Each trial runs the command on a pseudo-terminal (so rich draws as for a user),
waits until part of the answer is on screen, then types Ctrl-C (byte 0x03): the
terminal's line discipline turns it into SIGINT for the foreground process and
echoes "^C", exactly as an interactive shell would. Prints, per trial, the exit
status, the seconds from Ctrl-C to exit, and whether a traceback appeared; then
the screen text of the last trial.

    HF_HUB_OFFLINE=1 python benchmarks/ctrl_c.py --trials 4
"""

from __future__ import annotations

import argparse
import os
import pty
import re
import select
import sys
import time

from rich.console import Console
from rich.table import Table

COMMAND = [
    sys.executable,
    "-m",
    "specfuse.cli",
    "generate",
    "Count from one to one hundred in words.",
    *("-m", "smollm2-135m", "-m", "gemma3-270m"),
    *("--max-tokens", "300", "--segment-tokens", "2", "--temperature", "0"),
]
_ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


def _read(fd: int, into: bytearray, wait: float) -> bool:
    """Read what the terminal shows; False once the child closed it."""
    ready, _, _ = select.select([fd], [], [], wait)
    if not ready:
        return True
    try:
        data = os.read(fd, 4096)
    except OSError:  # EIO: the child exited and the terminal closed
        return False
    into.extend(data)
    return bool(data)


def _answer_on_screen(screen: bytes) -> int:
    """Characters of answer shown so far (the answer starts after the members' legend line)."""
    text = _ANSI.sub(b"", screen)
    if b"members:" not in text:
        return 0
    after = text.split(b"members:", 1)[1]
    return len(after.split(b"\n", 1)[1].strip()) if b"\n" in after else 0


def trial(answer_chars: int, limit: float) -> tuple[int | None, float, bytes]:
    """One run; the exit status is None when it had not exited `limit` s after Ctrl-C."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: the command, on the new terminal
        os.execvpe(COMMAND[0], COMMAND, {**os.environ, "COLUMNS": "100", "TERM": "xterm-256color"})
    screen = bytearray()
    while _read(fd, screen, 0.5) and _answer_on_screen(bytes(screen)) < answer_chars:
        pass
    typed = time.monotonic()
    os.write(fd, b"\x03")
    status = None
    while status is None and time.monotonic() - typed < limit:
        _read(fd, screen, 0.05)
        done, raw = os.waitpid(pid, os.WNOHANG)
        if done:
            status = raw
    took = time.monotonic() - typed
    if status is None:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    while _read(fd, screen, 0.2):
        pass
    os.close(fd)
    return (os.waitstatus_to_exitcode(status) if status is not None else None), took, bytes(screen)


def _as_seen(screen: bytes) -> str:
    """The final screen text: a carriage return lets the next text overwrite the line (spinners)."""
    lines = _ANSI.sub(b"", screen).decode(errors="replace").replace("\r\n", "\n").split("\n")
    return "\n".join(line.rsplit("\r", 1)[-1] for line in lines).rstrip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--answer-chars", type=int, default=20, help="answer text on screen before Ctrl-C")
    parser.add_argument("--limit", type=float, default=60.0, help="seconds to wait for the exit")
    args = parser.parse_args()
    table = Table(title="Ctrl-C mid-stream in `specfuse generate` (pseudo-terminal)")
    for column in ("trial", "exit status", "Ctrl-C to exit (s)", "traceback shown"):
        table.add_column(column, justify="right")
    screen = b""
    failed: list[tuple[int, bytes]] = []
    for i in range(1, args.trials + 1):
        code, took, screen = trial(args.answer_chars, args.limit)
        shown = "yes" if b"Traceback" in screen else "no"
        table.add_row(str(i), "still running" if code is None else str(code), f"{took:.2f}", shown)
        if code != 130 or b"Traceback" in screen:
            failed.append((i, screen))
    Console().print(table)
    for i, bad in failed:
        print(f"\nscreen of trial {i}, which did not exit cleanly:\n")
        print(_as_seen(bad))
    print("\nscreen of the last trial (colours removed):\n")
    print(_as_seen(screen))


if __name__ == "__main__":
    main()

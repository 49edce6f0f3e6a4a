"""A quiet start for the command line: TensorFlow's C++ start-up log lines filtered out of
stderr; everything else (our ``warning: ...`` lines, Python warnings, tracebacks) passes.

``TF_CPP_MIN_LOG_LEVEL`` alone does not do it: TensorFlow (2.16+) logs its first lines
(``oneDNN custom operations are on``, ``Could not find cuda drivers``, ``failed call to
cuInit``, after ``WARNING: All log messages before absl::InitializeLog() is called are
written to STDERR``) through absl before absl is initialised, and those ignore the level.
So the process's stderr (file descriptor 2, which C++ writes to) becomes a pipe into a
small filter process that drops absl-format lines below the level and forwards the rest.
A separate process rather than a thread: it never waits for the GIL (the first lines are
written while ``import tensorflow`` holds it) and drains the pipe even if we are killed.
Standard library only: this runs before anything heavy is imported.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from typing import Optional

#: absl's line prefix: severity, MMDD (0000 before absl is initialised), time, thread,
#: file:line (absl/log/internal/log_format.cc).
ABSL_LINE = re.compile(rb"^([IWEF])\d{4} \d\d:\d\d:\d+\.\d+ +\d+ [^ \]]+:\d+\] ")
PRE_INIT = b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
#: the second line of cpu_feature_guard.cc's message (the first is an absl line)
CONTINUATION = b"To enable the following instructions:"
SEVERITY = {b"I": 0, b"W": 1, b"E": 2, b"F": 3}
VERBOSE_ENV = "IPU_DIFFUSION_VERBOSE"


def wants_verbose(flag: bool) -> bool:
    """``--verbose`` or ``IPU_DIFFUSION_VERBOSE=1`` (any value but empty/0/false/no)."""
    value = os.environ.get(VERBOSE_ENV, "").strip().lower()
    return flag or value not in ("", "0", "false", "no")


def min_level() -> int:
    """``TF_CPP_MIN_LOG_LEVEL`` as TensorFlow reads it (an unset or bad value is 0)."""
    try:
        return int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
    except ValueError:
        return 0


def keep(line: bytes, level: int, after_dropped: bool) -> bool:
    """Whether one stderr line (without its newline) is shown at ``level``: absl lines
    whose severity is below it are not (fatal ones always are), nor the pre-init notice
    (level >= 1), nor the continuation of a dropped CPU-feature line."""
    match = ABSL_LINE.match(line)
    if match:
        return match.group(1) == b"F" or SEVERITY[match.group(1)] >= level
    if line.startswith(PRE_INIT):
        return level < 1
    return not (after_dropped and line.startswith(CONTINUATION))


class QuietStart:
    """While open, file descriptor 2 feeds the filter process. ``close()`` puts the
    original stderr back and waits until the filter has written everything."""

    def __init__(self) -> None:
        self._original: Optional[int] = None
        self._child: Optional[subprocess.Popen] = None

    def open(self) -> "QuietStart":
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        read, write = os.pipe()
        sys.stderr.flush()
        self._original = os.dup(2)
        try:  # -I: the standard library only, no script directory on sys.path
            self._child = subprocess.Popen(
                [sys.executable, "-I", os.path.abspath(__file__), str(min_level())],
                stdin=read, stdout=self._original, stderr=self._original)
        except OSError:  # no filter: keep the plain stderr
            os.close(write)
            os.close(read)
            os.close(self._original)
            self._original = None
            return self
        os.close(read)
        os.dup2(write, 2)
        os.close(write)
        return self

    def close(self) -> None:
        if self._original is None:
            return
        sys.stderr.flush()
        os.dup2(self._original, 2)  # the pipe's last writer goes: the filter sees EOF
        os.close(self._original)
        self._original = None
        if self._child is not None:
            try:
                self._child.wait(timeout=10)
            except subprocess.TimeoutExpired:  # a child process of ours still holds it
                pass

    def __enter__(self) -> "QuietStart":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()


def _filter(level: int) -> None:
    """The filter process: stdin to stdout, line by line, unbuffered."""
    for sig in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C is for the trainer; we end at EOF
        signal.signal(sig, signal.SIG_IGN)
    source, sink = sys.stdin.buffer.raw, sys.stdout.buffer.raw
    pending, dropped = b"", False
    while True:
        chunk = source.read(65536)
        if not chunk:
            break
        pending += chunk
        *lines, pending = pending.split(b"\n")
        out = []
        for line in lines:
            shown = keep(line, level, dropped)
            dropped = not shown
            if shown:
                out.append(line + b"\n")
        if out:
            _write_all(sink, b"".join(out))
        if pending and not _may_be_dropped(pending):
            _write_all(sink, pending)  # a partial line (a prompt, a progress bar): now
            pending, dropped = b"", False
    if pending and keep(pending, level, dropped):
        _write_all(sink, pending)


def _may_be_dropped(partial: bytes) -> bool:
    """Whether the start of a line could still become one that ``keep`` drops."""
    if partial[:1] in (b"I", b"W", b"E", b"F") and (len(partial) < 2 or partial[1:2].isdigit()):
        return True
    n = len(partial)
    return any(known[:n] == partial[:len(known)] for known in (PRE_INIT, CONTINUATION))


def _write_all(sink, data: bytes) -> None:
    while data:
        n = sink.write(data)
        data = data[n:]


if __name__ == "__main__":
    _filter(int(sys.argv[1]))

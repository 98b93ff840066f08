"""The foreground console (`serve -n --console`): each decision as a rich line, drawn by another process.

A rich line costs 100-500 µs and the request path cannot pay that, so the writer only writes each
record's JSON line to a non-blocking pipe (one write of at most PIPE_BUF bytes, so atomic) and moves on.
A renderer process, started before the sandbox, reads the pipe and draws. When it falls behind and the
pipe is full, lines are dropped from the console only (never from the trail) and counted; the renderer
says how many were not shown.

The renderer is a fresh interpreter (subprocess, close_fds), not a fork: it must not inherit the
server's sockets or the export's directory fd, and it needs nothing but the pipe and the terminal.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys

import gateway

F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ, named in the module only from Python 3.10 on some builds
PIPE_SIZE = 1 << 20  # room for a few thousand lines of burst (the default 64 KiB is ~200 lines)
_RENDERERS: dict[int, subprocess.Popen[bytes]] = {}


def start_console_renderer(*, output: int | None = None, pipe_size: int = PIPE_SIZE) -> int:
    """Start the renderer; returns the pipe's write end (non-blocking, close-on-exec) for
    AuditWriter.open(console=fd). output: the fd it draws on (default: this process's stdout)."""
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    # Over /proc/sys/fs/pipe-max-size for this user, the default size still works.
    with contextlib.suppress(OSError):
        fcntl.fcntl(write_end, getattr(fcntl, "F_SETPIPE_SZ", F_SETPIPE_SZ), pipe_size)
    root = os.path.dirname(os.path.dirname(os.path.abspath(gateway.__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        process = subprocess.Popen(
            [sys.executable, "-c", "from gateway.audit.console import main; main()"],
            stdin=read_end, stdout=output, close_fds=True, env=env,
        )  # fmt: skip
    except BaseException:
        os.close(write_end)
        raise
    finally:
        os.close(read_end)
    os.set_blocking(write_end, False)
    _RENDERERS[write_end] = process
    return write_end


def wait_console_renderer(fd: int, timeout: float = 5.0) -> int | None:
    """After the writer closed fd: let the renderer draw what is left; its exit status (None if it
    had to be stopped)."""
    process = _RENDERERS.pop(fd, None)
    if process is None:
        return None
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.terminate()
        process.wait()
        return None


def main() -> None:
    """The renderer: JSON lines on stdin, one rich line each on stdout, until EOF."""
    # Ctrl-C in the terminal is for the server; keep drawing until its last record (stop) and EOF.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from rich.console import Console
    from rich.text import Text

    from gateway.audit.views import console_text

    console = Console(highlight=False)
    for raw in sys.stdin.buffer:
        try:
            record = json.loads(raw)
        except ValueError:
            continue
        if not isinstance(record, dict):
            continue
        if set(record) == {"dropped"}:
            console.print(
                Text(
                    f"… {record['dropped']} records not shown (the console fell behind; "
                    "the trail has them all)",
                    style="yellow",
                )
            )
            continue
        console.print(console_text(record), soft_wrap=True)


if __name__ == "__main__":
    main()

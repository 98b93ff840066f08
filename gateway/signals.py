"""SIGHUP (reload the policy) and SIGUSR1 (reopen the trail): held from the first line of our code, then
turned into flags that the serve loop acts on between two requests.

Both signals terminate a process by default, and start-up (imports, the policy, the trail, the sandbox)
takes a few hundred milliseconds. So the entry points block them first thing (hold_reload_signals), and
install() unblocks them only once handlers exist: a signal sent meanwhile stays pending and is acted on
when serving starts, neither fatal nor lost.

Blocked rather than ignored: SIG_IGN would discard a reload asked for while the gateway waits for QEMU
to connect, and the policy it then served could be older than the operator believes.

What no code of ours can cover is the interpreter's own start-up (tens of milliseconds after exec, before
any line of the gateway runs): a supervisor that may signal that early starts the gateway with the
signals blocked (`env --block-signal=HUP,USR1`, as contrib/systemd/gateway@.service does), and the
gateway takes over from there.

The handlers only set a flag. Acting inside a handler re-entered whatever the main thread was doing: a
reload in the middle of writing a record wrote two records with the same seq and prev. The wakeup fd
(signal.set_wakeup_fd) lets the serve loop, idle in poll() on the socket and this fd, act at once.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

RELOAD_SIGNALS = frozenset({signal.SIGHUP, signal.SIGUSR1})


def hold_reload_signals() -> None:
    """Block SIGHUP and SIGUSR1 (they stay pending) until install(); call before anything heavy."""
    signal.pthread_sigmask(signal.SIG_BLOCK, RELOAD_SIGNALS)


def install(
    on_reload: Callable[[], None],
    on_reopen: Callable[[], None],
    on_wake: Callable[[], None] | None = None,
    on_stop: Callable[[], None] | None = None,
) -> int:
    """Handlers that call on_reload/on_reopen (which must only set a flag), a wakeup pipe, and the
    signals unblocked (a pending one is delivered now). Returns the pipe's read end for the loop to poll.
    on_wake: SIGUSR2's handler, which the reload worker sends to say a policy is ready to swap in.
    on_stop: SIGTERM's and SIGINT's (systemctl stop, ^C): the session ends between two requests, with
    its stop record, instead of the process dying between any two instructions.

    The pipe is made here, before the sandbox: pipe2 is not on the seccomp allowlist.
    """
    read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.signal(signal.SIGHUP, lambda *_: on_reload())
    signal.signal(signal.SIGUSR1, lambda *_: on_reopen())
    if on_wake is not None:
        signal.signal(signal.SIGUSR2, lambda *_: on_wake())
    if on_stop is not None:
        signal.signal(signal.SIGTERM, lambda *_: on_stop())
        signal.signal(signal.SIGINT, lambda *_: on_stop())
    # A storm fills the pipe; the flags already say all there is to say, so a full pipe is no warning.
    signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, RELOAD_SIGNALS)
    return read_end


def drain(fd: int) -> bytes:
    """Empty the wakeup pipe; the signal numbers that were written to it."""
    seen = b""
    while True:
        try:
            chunk = os.read(fd, 512)
        except BlockingIOError:
            return seen
        if not chunk:
            return seen
        seen += chunk

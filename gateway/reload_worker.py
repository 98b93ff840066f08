"""SIGHUP's reload off the request path: a thread reads, validates and compiles the new policy while the
serve loop goes on serving with the old one; the loop swaps the result in between two requests.

The thread is started once, before the system-call filter and the resource limits, and after every other
step of the sandbox (chroot, capabilities, no_new_privs, Landlock), so that it inherits all of them; the
filter is then loaded for both threads at once (seccomp TSYNC). No clone is ever allowed afterwards.
It never touches the export: all it does is read the policy through its directory's fd and compile it.

Done, it wakes the serve loop with SIGUSR2 sent to the main thread alone (tgkill, the one signal the filter
lets it send, to this process only): the loop, idle in recv, swaps at once; busy, between two requests.
"""

from __future__ import annotations

import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from gateway.rules import Policy

WAKE_SIGNAL = signal.SIGUSR2
# Signals the thread never takes: they must interrupt the main thread's recv (gateway.signals).
_MAIN_THREAD_SIGNALS = {signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT, signal.SIGTERM}


@dataclass(frozen=True)
class ReloadOutcome:
    """What one reload produced: the new policy, or the error that refused it."""

    policy: Policy | None
    error: Exception | None
    seconds: float  # reading and compiling it took this long, off the request path


class ReloadWorker:
    """One long-lived thread; request() asks for a reload (several while one runs ask for one more)."""

    def __init__(self, reloader: Callable[[], Policy], main_thread: int | None = None) -> None:
        self._reloader = reloader
        self._main = threading.main_thread().ident if main_thread is None else main_thread
        self._wanted = threading.Event()
        self._lock = threading.Lock()
        self._outcomes: deque[ReloadOutcome] = deque()
        self.busy = False  # a reload is being read or compiled (tests and the bench read it)
        self._thread = threading.Thread(target=self._run, name="gateway-reload", daemon=True)
        # Started with the main thread's signals blocked, so that the new thread has them blocked from its
        # first instruction: none can land on it and miss the recv it is meant to interrupt.
        old = signal.pthread_sigmask(signal.SIG_BLOCK, _MAIN_THREAD_SIGNALS)
        try:
            self._thread.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)

    def request(self) -> None:
        self._wanted.set()

    def take(self) -> list[ReloadOutcome]:
        """The outcomes ready since the last take, oldest first (each gets its record)."""
        with self._lock:
            ready = list(self._outcomes)
            self._outcomes.clear()
        return ready

    def _run(self) -> None:
        while True:
            self._wanted.wait()
            self._wanted.clear()  # a request from now on asks for one more reload, after this one
            self.busy = True
            began = time.monotonic()
            try:
                policy: Policy | None = self._reloader()
                error: Exception | None = None
            except Exception as exc:  # PolicyError, OSError, anything: the old policy must survive it
                policy, error = None, exc
            outcome = ReloadOutcome(policy, error, time.monotonic() - began)
            with self._lock:
                self._outcomes.append(outcome)
            self.busy = False
            if self._main is not None:
                signal.pthread_kill(self._main, WAKE_SIGNAL)

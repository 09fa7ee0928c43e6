"""SIGINT/SIGTERM as "stop at the next safe point", never as an exception inside XLA.

Why not Python's default KeyboardInterrupt: jaxlib waits for an XLA compilation while polling for
Python signals; Ctrl-C raises KeyboardInterrupt out of that wait while the compilation keeps running
on XLA's own thread. The interpreter then shuts down under that thread and the process dies with
`Fatal Python error: Segmentation fault` (exit 139) or hangs. During a running computation the
exception only arrives once the computation returns, with a traceback, and a half-finished chunk of
candidates is lost.

`deferred_signals()` installs a Python handler that does nothing (so no exception is ever raised into
jaxlib) plus a wakeup file descriptor, which the C-level signal handler writes the signal number to at
once — even while the main thread is inside XLA. A watcher thread reads it:

* first signal: sets the stop flag and says so on stderr. The driver calls `check()` between calls
  (after a chunk of candidates is recorded, between phases); it raises `Interrupted`, the run unwinds
  normally, and the CLI prints how to resume and exits 130.
* the same signal again within `DUPLICATE_WINDOW_S`: the same request delivered twice, ignored.
  `timeout -s TERM N cmd` sends the signal to its child and then to the child's whole process group,
  so a command run directly under timeout(1) receives every signal twice, microseconds apart; taken
  as two requests it would abandon the run instead of stopping it cleanly.
* a second signal after that: abandon now. The registered flush callbacks run (close progress bars, flush logs —
  records are fsynced as they are appended anyway), the resume hint is printed, and the process ends
  with `os._exit(130)`, which skips interpreter shutdown and so cannot race XLA's threads.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
import time
from typing import Callable, Iterator, Optional, Sequence

from seal_jax.errors import EXIT_INTERRUPTED, Interrupted

_lock = threading.Lock()
_active: Optional["_Watcher"] = None
_resume_hint: Optional[str] = None
DUPLICATE_WINDOW_S = 0.2  # a repeat of the first signal this soon is the same request (see above)


class _Watcher:
    def __init__(self, signals: Sequence[int]):
        self.signals = tuple(signals)
        self.count = 0
        self.first_signal: Optional[int] = None
        self.first_time = 0.0
        self.stop = threading.Event()
        self.flush_callbacks: list[Callable[[], None]] = []
        self._rsock, self._wsock = socket.socketpair()
        self._rsock.setblocking(True)
        self._wsock.setblocking(False)
        self._thread = threading.Thread(target=self._watch, name="seal-signal-watcher", daemon=True)
        self._closing = False

    def install(self) -> None:
        self._old_handlers = {s: signal.getsignal(s) for s in self.signals}
        for s in self.signals:
            signal.signal(s, _ignore_in_python)
        self._old_wakeup = signal.set_wakeup_fd(self._wsock.fileno(), warn_on_full_buffer=False)
        self._thread.start()

    def uninstall(self) -> None:
        signal.set_wakeup_fd(self._old_wakeup)
        for s, handler in self._old_handlers.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        self._closing = True
        try:
            self._wsock.send(b"\x00")  # wake the watcher so it exits
        except OSError:
            pass
        self._thread.join(timeout=5)
        self._rsock.close()
        self._wsock.close()

    def _watch(self) -> None:
        while True:
            try:
                data = self._rsock.recv(64)
            except OSError:
                return
            if self._closing or not data:
                return
            for signum in data:
                if signum in self.signals:
                    self._on_signal(signum)

    def _on_signal(self, signum: int) -> None:
        now = time.monotonic()
        if self.count and signum == self.first_signal and now - self.first_time < DUPLICATE_WINDOW_S:
            return  # delivered to this process and to its process group at once (timeout(1))
        self.count += 1
        name = signal.Signals(signum).name
        if self.count == 1:
            self.first_signal, self.first_time = signum, now
            self.stop.set()
            _say(f"\n{name}: stopping after the current call (send it again to abandon now)")
            return
        _say(f"\n{name} again: abandoning now")
        for callback in list(self.flush_callbacks):
            try:
                callback()
            except Exception as e:  # one failing flush must not block the others or the exit
                _say(f"flush failed: {e!r}")
        if _resume_hint:
            _say(_resume_hint)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_INTERRUPTED)


def _ignore_in_python(signum, frame) -> None:
    """Python-level handler: deliberately nothing; the watcher thread reacts via the wakeup fd."""


def _say(text: str) -> None:
    try:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()
    except Exception:
        pass


@contextlib.contextmanager
def deferred_signals(signals: Sequence[int] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """Within the block, the first signal requests a stop (`check()`), the second exits (130).

    Outside the main thread (where Python cannot install handlers) or when already active (nested
    use), the block runs unchanged.
    """
    global _active
    if threading.current_thread() is not threading.main_thread() or _active is not None:
        yield
        return
    watcher = _Watcher(signals)
    watcher.install()
    with _lock:
        _active = watcher
    try:
        yield
    finally:
        with _lock:
            _active = None
        watcher.uninstall()


def stop_requested() -> bool:
    watcher = _active
    return watcher is not None and watcher.stop.is_set()


def check(where: str = "") -> None:
    """Raise `Interrupted` (with the resume hint) if a stop was requested. Call between calls."""
    watcher = _active
    if watcher is not None and watcher.stop.is_set():
        name = signal.Signals(watcher.first_signal).name if watcher.first_signal else "signal"
        at = f" after {where}" if where else ""
        raise Interrupted(f"stopped by {name}{at}", hint=_resume_hint)


def set_resume_hint(text: Optional[str]) -> None:
    """What to print when the run stops (e.g. the command with --config.resume=<run dir>)."""
    global _resume_hint
    _resume_hint = text


def on_abandon(callback: Callable[[], None]) -> Callable[[], None]:
    """Register a flush callback for the second signal; returns a function that unregisters it."""
    watcher = _active
    if watcher is None:
        return lambda: None
    watcher.flush_callbacks.append(callback)

    def remove() -> None:
        with contextlib.suppress(ValueError):
            watcher.flush_callbacks.remove(callback)

    return remove

"""Nothing the CLI starts outlives it.

``Reaper``: a small watchdog process started by the CLI (``python -m meshdl.node.reaper``)
that reads registrations (processes, process groups, directories) from a pipe. The pipe
is its only link to the parent: when it closes -- the parent exited normally, crashed,
or was SIGKILLed -- the watchdog terminates whatever is still registered (SIGTERM, then
SIGKILL after a grace period) and removes the directories. It runs in its own session,
so the terminal's Ctrl-C / hang-up does not reach it, and it exits once its work is
done: it outlives nothing. A process is identified by (pid, start time), so a recycled
pid is never signalled.

``watch_parent(on_gone)``: inside a child (``meshdl node start`` spawned by the CLI):
ask the kernel for SIGTERM when the parent dies (``PR_SET_PDEATHSIG``, Linux) and poll
``os.getppid()`` as a fallback (other systems, or a parent thread that exits).
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

PARENT_ENV = "MESHDL_PARENT_PID"
PDEATHSIG_ENV = "MESHDL_PDEATHSIG"
GRACE_S = 1.0


def start_time(pid: int) -> str | None:
    """The process's start time in clock ticks (field 22 of /proc/PID/stat), or None when
    the pid is gone or a zombie."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2:].split()
    if fields[0] in ("Z", "X"):
        return None
    return fields[19]


class Reaper:
    """The parent's handle on the watchdog process (see the module doc)."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()

    def __enter__(self) -> "Reaper":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> "Reaper":
        if self._proc is None:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "meshdl.node.reaper", str(os.getpid())],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True, close_fds=True)
        return self

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def _send(self, line: str) -> None:
        with self._lock:
            if self._proc is None or self._proc.stdin is None:
                return
            try:
                self._proc.stdin.write((line + "\n").encode())
                self._proc.stdin.flush()
            except (BrokenPipeError, ValueError):
                log.warning("the reaper process is gone; cleanup at exit is best effort")

    def add_process(self, pid: int, group: bool = False) -> None:
        """Terminate ``pid`` (its whole process group with ``group``) if we die first."""
        st = start_time(pid)
        if st is not None:
            self._send(f"{'group' if group else 'pid'} {pid} {st}")

    def add_dir(self, path: str | os.PathLike) -> None:
        self._send(f"dir {os.fspath(path)}")

    def forget(self, pid: int) -> None:
        self._send(f"forget {pid}")

    def close(self, timeout: float = 3.0) -> None:
        """Close the pipe (the watchdog cleans what is still registered) and wait."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with self._lock:
            try:
                proc.stdin.close()
            except OSError:
                pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(1)


# ---------------------------------------------------------------- the watchdog process
def _alive(pid: int, st: str) -> bool:
    return start_time(pid) == st


def _reap(procs: dict[int, tuple[bool, str]], dirs: list[str]) -> None:
    def signal_all(sig: int) -> None:
        for pid, (group, st) in procs.items():
            if not _alive(pid, st):
                continue
            try:
                os.killpg(pid, sig) if group else os.kill(pid, sig)
            except OSError:
                pass
    signal_all(signal.SIGTERM)
    deadline = time.monotonic() + GRACE_S
    while time.monotonic() < deadline and any(_alive(p, st) for p, (_, st) in procs.items()):
        time.sleep(0.05)
    signal_all(signal.SIGKILL)
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


def _main(argv: list[str]) -> int:
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)        # only the pipe ends this process
    procs: dict[int, tuple[bool, str]] = {}
    dirs: list[str] = []
    for raw in sys.stdin.buffer:
        parts = raw.decode(errors="replace").rstrip("\n").split(" ", 1)
        if len(parts) != 2:
            continue
        kind, rest = parts
        if kind in ("pid", "group"):
            pid, _, st = rest.partition(" ")
            procs[int(pid)] = (kind == "group", st)
        elif kind == "forget":
            procs.pop(int(rest), None)
        elif kind == "dir":
            dirs.append(rest)
    _reap(procs, dirs)
    return 0


# ---------------------------------------------------------------- inside a child
def _set_pdeathsig(sig: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(1, int(sig), 0, 0, 0) == 0          # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return False


def watch_parent(on_gone: Callable[[], None], period: float = 0.25) -> bool:
    """When spawned by the CLI (``MESHDL_PARENT_PID`` set): call ``on_gone`` once the
    parent is gone. Returns False when not asked to watch."""
    want = os.environ.get(PARENT_ENV)
    if not want:
        return False
    parent = int(want)
    if os.environ.get(PDEATHSIG_ENV) == "1":
        _set_pdeathsig(signal.SIGTERM)
    if os.getppid() != parent:        # it died before we could ask
        on_gone()
        return True

    def poll() -> None:
        while os.getppid() == parent:
            time.sleep(period)
        log.warning("parent process %d is gone: leaving the mesh", parent)
        on_gone()
    threading.Thread(target=poll, name="meshdl-parent-watch", daemon=True).start()
    return True


def child_env(env: dict | None = None) -> dict:
    """Environment for a child that must die with this process (see ``watch_parent``)."""
    out = dict(os.environ if env is None else env)
    out[PARENT_ENV] = str(os.getpid())
    # PDEATHSIG follows the *thread* that forked: only ask for it from the main thread
    out[PDEATHSIG_ENV] = "1" if threading.current_thread() is threading.main_thread() else "0"
    return out


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))

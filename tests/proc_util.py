"""Find the processes one test started, however they were re-parented: every process
whose environment carries the test's tag (children inherit the environment)."""
from __future__ import annotations

import os
import time
from pathlib import Path

TAG_VAR = "MESHDL_TEST_TAG"


def tagged(tag: str) -> list[int]:
    """PIDs of live (non-zombie) processes whose environment has TAG_VAR=tag."""
    needle = f"{TAG_VAR}={tag}".encode()
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            env = (d / "environ").read_bytes()
            stat = (d / "stat").read_text()
        except OSError:
            continue
        if needle in env.split(b"\0") and stat[stat.rfind(")") + 2] not in "ZX":
            out.append(int(d.name))
    return sorted(out)


def wait_gone(tag: str, timeout: float) -> list[int]:
    """Wait until no tagged process is left; returns the survivors at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        left = tagged(tag)
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.05)


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return "?"


def kill_tagged(tag: str) -> None:
    """Last-resort cleanup so a failing test leaves nothing behind (only our tag)."""
    import signal
    for pid in tagged(tag):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def rss_kb(pid: int) -> int:
    """Resident memory of a live process, in KiB (0 when /proc does not say)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def wait_for(cond, timeout: float = 10.0, step: float = 0.005) -> bool:
    """Poll ``cond`` until it holds or ``timeout`` passes; its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step)
    return bool(cond())

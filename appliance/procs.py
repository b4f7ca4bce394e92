"""Process liveness from /proc, shared by the arbiter's callers, launchers and tests.

A PID whose process has exited but was not reaped yet (state Z, or X while it goes) is as good as gone:
on machines where PID 1 does not reap, orphans linger as zombies, so "the PID exists" is not enough.
"""

from __future__ import annotations


def pid_gone(pid: int) -> bool:
    """True if ``pid`` has no live process: no /proc entry, or a zombie/dead one."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return True

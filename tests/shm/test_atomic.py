"""The patomic-backed atomics: values, 64-bit wraparound, and per-thread scratch for SharedAtomics."""

from __future__ import annotations

import threading

from shm.atomic import Atomics, SharedAtomics, buffer_address


def test_load_store_fetch_add_wrap() -> None:
    buf = bytearray(16)
    addr, keeper = buffer_address(buf)
    a = Atomics()
    a.store_release(addr + 8, (1 << 64) - 2)
    assert a.load_acquire(addr + 8) == (1 << 64) - 2 and a.load_relaxed(addr + 8) == (1 << 64) - 2
    assert a.fetch_add(addr + 8, 3) == (1 << 64) - 2
    assert a.load_acquire(addr + 8) == 1  # wrapped mod 2**64
    assert a.load_release_rmw(addr + 8) == 1 and a.load_acquire(addr + 8) == 1
    assert buf[8:16] == (1).to_bytes(8, "little") and buf[0:8] == bytes(8)  # exactly that word
    del keeper


def test_shared_atomics_use_a_scratch_word_per_thread() -> None:
    shared = SharedAtomics()
    buf = bytearray(8)
    addr, keeper = buffer_address(buf)
    seen: list[int] = []
    errors: list[int] = []

    def hammer(value: int) -> None:
        seen.append(shared._outp)
        for _ in range(20000):
            shared.store_release(addr, value)
            v = shared.load_acquire(addr)
            if v not in (1, 2):
                errors.append(v)

    threads = [threading.Thread(target=hammer, args=(v,)) for v in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(seen)) == 2 and not errors
    del keeper


def test_plain_ordered_only_on_x86_64_and_overridable() -> None:
    """The TSO fast path is chosen by CPU, and VA_SHM_PATOMIC=1 forces the patomic calls."""
    import os
    import platform
    import subprocess
    import sys

    from shm import atomic

    assert atomic.PLAIN_ORDERED == (platform.machine().lower() in ("x86_64", "amd64")
                                    and os.environ.get("VA_SHM_PATOMIC", "") not in ("1", "true", "yes"))
    code = "from shm import atomic; print(atomic.PLAIN_ORDERED)"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "VA_SHM_PATOMIC": "1"},
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"

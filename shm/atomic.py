"""Acquire/release 64-bit atomics on raw addresses in a shared mapping.

Why: the rings publish a cursor after copying a frame. On x86 a plain store is already a release
and a plain load an acquire, but on aarch64 (Hetzner CAX) neither is, and CPython's memoryview
stores carry no ordering at all. We therefore need real ``__atomic_load_n(…, ACQUIRE)`` /
``__atomic_store_n(…, RELEASE)`` instructions.

Which library and why: ``atomics2`` (maintained fork of ``atomics``) bundles ``patomic``, a C
library with per-memory-order load/store/fetch_add implementations for x86_64 *and* aarch64
wheels. Its Python-level objects (``atomicview(...).load()``) cost ~5.5 µs per operation here
(several layers of Python + ctypes per call) — over our whole 5 µs per frame budget. Calling
patomic's own function pointers through ``ctypes`` costs ~0.3 µs per operation, so a ring
write/read (two or three atomic operations + one memcpy) costs ~1-1.5 µs. That beats a hand-written
C extension on deployability (no compiler or Python headers on the build host, one wheel per
architecture from PyPI) at a price that fits the budget. The only private surface we touch is
``atomics2._impl.patomic.Patomic.ops`` (pinned ``atomics2>=1.1,<2``); an import failure raises a
clear error at first use.

x86-64 fast path (``PLAIN_ORDERED``): x86 is TSO — every aligned 8-byte load already has acquire and
every store release semantics in hardware — and CPython reads/writes a ``memoryview`` item of format
``Q`` as one aligned 8-byte move inside its own C call (the compiler cannot move it across the
interpreter's other calls). So on x86-64 the per-frame ring cursors are read and published through the
ring header's memoryview (~0.02 µs) instead of a ctypes call (~0.3-0.5 µs); with ~13 such operations per
session per 20 ms tick across both workers that was ~0.2 ms CPU per session-second. Other CPUs
(aarch64) keep the patomic calls; ``VA_SHM_PATOMIC=1`` forces them everywhere (tests run both paths).
Seqlocks and control-plane fields always use patomic (they are not per-frame).

All functions take absolute addresses (int) into a mapping the caller keeps alive. Using an
address after its mapping is unmapped would crash the process, so the segment code never hands
out addresses after ``close()``.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
import threading
from typing import Any

_ORDER_RELAXED = 0
_ORDER_ACQUIRE = 2
_ORDER_RELEASE = 3
_ORDER_ACQ_REL = 4


def _ops() -> Any:
    try:
        from atomics2._impl.patomic import Patomic
    except Exception as exc:  # pragma: no cover - only with an incompatible atomics2
        raise ImportError(f"shm needs atomics2 1.x with patomic ({exc})") from exc
    ops = Patomic.ops(8)
    if not ops.fp_load or not ops.fp_store or not ops.arithmetic_ops.fp_fetch_add:
        raise ImportError("atomics2/patomic has no lock-free 64-bit load/store/fetch_add on this CPU")
    return ops


def _pyfunc(fp: Any, *argtypes: Any) -> Any:
    """Re-type a patomic function pointer as PYFUNCTYPE: the call keeps the GIL (no release/re-acquire
    around a few-nanosecond instruction), ~15 % cheaper than the CFUNCTYPE atomics2 declares."""
    address = ctypes.cast(fp, ctypes.c_void_p).value
    assert address is not None, "patomic returned a NULL function pointer"
    return ctypes.PYFUNCTYPE(None, *argtypes)(address)


PLAIN_ORDERED = (platform.machine().lower() in ("x86_64", "amd64")
                 and os.environ.get("VA_SHM_PATOMIC", "") not in ("1", "true", "yes"))

_OPS = _ops()
_VP, _INT = ctypes.c_void_p, ctypes.c_int
_LOAD = _pyfunc(_OPS.fp_load, _VP, _INT, _VP)  # (addr, order, out*)
_STORE = _pyfunc(_OPS.fp_store, _VP, _VP, _INT)  # (addr, in*, order)
_FETCH_ADD = _pyfunc(_OPS.arithmetic_ops.fp_fetch_add, _VP, _VP, _INT, _VP)  # (addr, arg*, order, out*)

if sys.byteorder != "little":  # pragma: no cover - the layout is little-endian
    raise ImportError("shm layout assumes a little-endian CPU")


class _Ops:
    """The operations; subclasses provide the in/out scratch words ``_in``/``_out`` and their addresses."""

    __slots__ = ()
    _in: ctypes.c_uint64
    _out: ctypes.c_uint64
    _inp: int
    _outp: int

    def _init_scratch(self) -> None:
        # The slots live on the concrete subclasses (an empty base keeps them __dict__-free).
        self._in = ctypes.c_uint64(0)  # type: ignore[misc]
        self._out = ctypes.c_uint64(0)  # type: ignore[misc]
        self._inp = ctypes.addressof(self._in)  # type: ignore[misc]
        self._outp = ctypes.addressof(self._out)  # type: ignore[misc]

    def load_acquire(self, addr: int) -> int:
        """Atomic 64-bit load with acquire ordering."""
        _LOAD(addr, _ORDER_ACQUIRE, self._outp)
        return self._out.value

    def load_relaxed(self, addr: int) -> int:
        """Atomic 64-bit load, no ordering (statistics, own words)."""
        _LOAD(addr, _ORDER_RELAXED, self._outp)
        return self._out.value

    def store_release(self, addr: int, value: int) -> None:
        """Atomic 64-bit store with release ordering."""
        self._in.value = value
        _STORE(addr, self._inp, _ORDER_RELEASE)

    def fetch_add(self, addr: int, value: int, order: int = _ORDER_ACQ_REL) -> int:
        """Atomic 64-bit fetch-and-add (mod 2**64); returns the previous value."""
        self._in.value = value
        _FETCH_ADD(addr, self._inp, order, self._outp)
        return self._out.value

    def load_release_rmw(self, addr: int) -> int:
        """``fetch_add(addr, 0, RELEASE)``: a load that earlier loads cannot move after.

        This is the second read of a seqlock (Boehm, "Can seqlocks get along with programming
        language memory models?"): it keeps the data copy ordered before the re-check.
        """
        return self.fetch_add(addr, 0, _ORDER_RELEASE)


class Atomics(_Ops):
    """Atomics with one scratch word pair: use an instance from ONE thread only (each ring side owns one;
    a value could be clobbered between the C call and reading it back if two threads shared it)."""

    __slots__ = ("_in", "_inp", "_out", "_outp")

    def __init__(self) -> None:
        self._init_scratch()


class SharedAtomics(threading.local, _Ops):
    """Atomics safe to share between threads (a scratch pair per thread), ~0.15 µs slower per call.

    Used for slot control-plane fields, which the supervisor may touch from several threads."""

    def __init__(self) -> None:
        self._init_scratch()


def buffer_address(buf: Any) -> tuple[int, Any]:
    """Return (address, keeper) of a writable buffer; drop ``keeper`` before closing the buffer."""
    keeper = (ctypes.c_char * len(buf)).from_buffer(buf)
    return ctypes.addressof(keeper), keeper

"""Suite-wide guard: an ``async`` test that hangs is cancelled INSIDE its event loop before pytest-timeout.

Why: pytest-timeout's signal method raises ``Failed: Timeout`` from a SIGALRM handler wherever the main
thread happens to be — usually inside the event loop's ``select()``. The test task is then left pending,
the loop is unwound from the outside, and pytest-asyncio's runner teardown (``_cancel_all_tasks``) can
wait forever on it (seen in CI: a hung test, then a teardown that never ended). Cancelling the test task
from within the loop (``asyncio.timeout``) ends it the normal way: ``finally`` blocks and ``async with``
exits run, the traceback shows the await that hung, fixture teardown runs on a healthy loop, and
pytest-timeout stays armed for a hang in teardown or in sync code. The Makefile's ``timeout`` wrapper is
the last net for everything else.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import signal
import threading
from collections.abc import Callable
from typing import Any

import pytest

# Share of the item's pytest-timeout given to the test body; the rest is left for fixture teardown.
_BODY_SHARE = 0.8


def _item_timeout(item: pytest.Item) -> float:
    marker = item.get_closest_marker("timeout")
    if marker is not None:
        value = marker.args[0] if marker.args else marker.kwargs.get("timeout")
        if value is not None:
            return float(value)
    try:
        return float(item.config.getini("timeout") or 0)
    except ValueError:
        return 0.0


def _bounded(func: Callable[..., Any], limit: float, nodeid: str) -> Callable[..., Any]:
    @functools.wraps(func)
    async def run_bounded(*args: Any, **kwargs: Any) -> Any:
        try:
            async with asyncio.timeout(limit):
                return await func(*args, **kwargs)
        except TimeoutError as exc:
            # asyncio.timeout turned our cancellation into TimeoutError; a TimeoutError raised by the test
            # itself has no CancelledError context
            if isinstance(exc.__context__, asyncio.CancelledError):
                pytest.fail(f"{nodeid}: async test body still running after {limit:.0f} s "
                            "(cancelled where it hung — see the traceback)")
            raise

    return run_bounded


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        func = getattr(item, "obj", None)
        if not isinstance(item, pytest.Function) or not inspect.iscoroutinefunction(func):
            continue
        if getattr(func, "is_hypothesis_test", False):
            continue  # pytest-asyncio drives hypothesis' inner test itself
        limit = _item_timeout(item)
        if limit > 0:
            item.obj = _bounded(func, limit * _BODY_SHARE, item.nodeid)


# If pytest-timeout had to fire during the test itself (a body that ignored the in-loop cancellation, or
# sync code), its one alarm is spent: give the teardown an alarm of its own, so a runner teardown that
# waits on the abandoned test task fails this test instead of hanging the whole run.
_TEARDOWN_AFTER_TIMEOUT_S = 60
_timed_out = pytest.StashKey[bool]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed and "from pytest-timeout" in str(report.longrepr):
        item.stash[_timed_out] = True


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Any:
    if not item.stash.get(_timed_out, False) or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum: int, frame: Any) -> None:
        pytest.fail(f"teardown still running {_TEARDOWN_AFTER_TIMEOUT_S} s after the test timed out")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, _TEARDOWN_AFTER_TIMEOUT_S)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# Environment skips (no root, no Janus, no Chromium modules) keep a partial developer checkout usable, but
# `make test` installs everything, so there a skip means a missing install step, never a pass:
# the Makefile sets VA_TESTS_REQUIRE_ALL=1 and any skipped test fails the run.
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    import os

    if os.environ.get("VA_TESTS_REQUIRE_ALL") != "1":
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    if skipped and exitstatus == 0:
        for report in skipped:
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
            print(f"SKIPPED under make test (VA_TESTS_REQUIRE_ALL=1): {report.nodeid}: {reason}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED

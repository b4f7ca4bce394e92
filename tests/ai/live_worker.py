"""Running the real AI worker loop in a test (against the emulator) and waiting on its state."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from workers.ai.greeting import PromptCache
from workers.ai.worker import AiWorker

# Config section for tests whose model.greeting is "" (the AI disclosure then has to be off explicitly).
DEFAULT = object()  # running(): the emulator's Developer API settings

NO_DISCLOSURE = {"ai_disclosure": False, "ai_disclosure_off_reason": "test without a greeting"}


@contextlib.asynccontextmanager
async def running(cfg, seg, emu, tmp_path, *, settings=DEFAULT) -> AsyncIterator[AiWorker]:
    """An ``AiWorker`` on ``seg`` ticking in this loop (TLS to ``emu``, journal in ``tmp_path``;
    ``settings=None``: the worker's own from ``cfg``, e.g. Vertex AI with a service account)."""
    w = AiWorker(cfg, seg, settings=emu.client_settings() if settings is DEFAULT else settings,
                 prompts=PromptCache(tmp_path), journal_dir=tmp_path)
    await w.prepare()
    stop = asyncio.Event()
    task = asyncio.create_task(w.run(stop))
    try:
        yield w
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


async def until(pred, limit: float = 30.0, what: str = "condition") -> None:
    """Poll ``pred`` every 10 ms until true; AssertionError naming ``what`` after ``limit`` seconds."""
    deadline = time.monotonic() + limit
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)

"""A worker's life around its requests: native threads capped, the configured bundle loaded
before connections are accepted, and other workers' reloads followed (serving/sync.py).

    FastAPI(lifespan=lifespan)     reads `app.state.serving` (serving/state.py)
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool

from serving.source import load_model
from serving.state import AppState
from serving.sync import NoteWatcher, read_note

logger = logging.getLogger("serving")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    state: AppState = app.state.serving
    settings = state.settings
    restore = limit_native_threads(settings.native_threads)
    follower = None
    if settings.reload_file is not None:
        note = read_note(settings.reload_file)
        if note is not None and state.model is None:  # a worker started after a reload
            state.source, state.applied_note = note.source, note.id
        follower = asyncio.create_task(follow_reloads(state, settings.reload_file))
    if state.model is None and state.source is not None:
        await initial_load(state)  # before the worker accepts connections
    try:
        yield
    finally:
        if follower is not None:
            follower.cancel()
        if state.events is not None:
            await run_in_threadpool(state.events.close)
        restore()


def limit_native_threads(n: int) -> Callable[[], None]:
    """Cap this process's BLAS (numpy) and OpenMP (LightGBM, torch) threads at `n`; returns
    the undo. Per-request work is small, extra threads do not speed it up, and idle OpenBLAS /
    OpenMP threads busy-wait: measured, a spinning BLAS thread used a whole core beside each
    worker. Needs `threadpoolctl`; without it a warning says to set OMP_NUM_THREADS and
    OPENBLAS_NUM_THREADS before start (`serve` sets them for its worker processes)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        logger.warning("threadpoolctl is not installed: native threads not limited; set "
                       "OMP_NUM_THREADS=%d OPENBLAS_NUM_THREADS=%d before start", n, n)  # fmt: skip
        return lambda: None
    limiter = threadpool_limits(limits=n)
    return limiter.restore_original_limits  # type: ignore[no-any-return]


async def follow_reloads(state: AppState, path: Path) -> None:
    """Apply the reload notes other workers write (serving/sync.py), until cancelled."""
    watcher = NoteWatcher(path)
    while True:
        await asyncio.sleep(state.settings.reload_poll_seconds)
        note = watcher.poll()
        if note is None or note.id == state.applied_note:
            continue
        async with state.reload_lock:
            if note.id == state.applied_note:
                continue
            state.applied_note = note.id  # tried once: a bad bundle is not retried every second
            try:
                model = await run_in_threadpool(load_model, note.source, state.settings)
            except Exception as e:
                state.metrics.reload(ok=False)
                logger.error("could not follow the reload to %s: %s", note.source, e)
                continue
            await run_in_threadpool(state.swap, model, note.source)
            state.metrics.reload(ok=True)
            logger.info("followed the reload to %s (%s)", note.source, model.model_version)


async def initial_load(state: AppState) -> None:
    """Load the configured source; on failure the process stays up and /readyz says why."""
    source = state.source
    assert source is not None
    state.status, state.detail = "loading", f"loading {source}"
    try:
        model = await run_in_threadpool(load_model, source, state.settings)
    except Exception as e:  # keep the process up: /readyz says why, a reload can fix it
        logger.error("could not load %s: %s", source, e)
        state.status, state.detail = "failed", f"could not load {source}: {e}"
        return
    if state.model is None:  # an admin reload may have won the race
        await run_in_threadpool(state.swap, model, source)

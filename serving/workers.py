"""Several server processes on one port, each with its own listening socket (SO_REUSEPORT).

uvicorn's own `--workers` shares one listening socket between its processes, and whichever
process wakes first accepts every pending connection: with long-lived keep-alive connections
(a load balancer, a benchmark) one worker ends up with nearly all of them. Measured on the demo
bundle with 32 connections and 2 workers: 7.15 CPU-seconds in one worker, 0.03 in the other.
Here each worker binds its own socket with SO_REUSEPORT, and the kernel spreads new connections
evenly over the listening sockets. A worker listens only once its bundle is loaded, so no
connection waits on a loading worker.

    run_workers(n, host, port, log_level=..., access_log=...)   # blocks until SIGINT/SIGTERM

Each worker builds its app from the environment (`serving.app.app_from_env`); a worker that
dies is restarted.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import socket
import time
from typing import Any

logger = logging.getLogger("serving")


def reuseport_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port with SO_REUSEADDR and SO_REUSEPORT (not yet listening)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def _worker(host: str, port: int, log_level: str, access_log: bool) -> None:
    import uvicorn

    sock = reuseport_socket(host, port)
    config = uvicorn.Config(
        "serving.app:app_from_env",
        factory=True,
        log_level=log_level,
        access_log=access_log,
        lifespan="on",
    )
    uvicorn.Server(config).run(sockets=[sock])


def _forget_metrics(pid: int | None) -> None:
    """A dead worker's live gauges leave the shared metrics (its counters stay summed)."""
    if pid is None or not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)


def run_workers(
    n: int, host: str, port: int, *, log_level: str = "info", access_log: bool = True
) -> None:
    """Run `n` worker processes on host:port until SIGINT or SIGTERM, restarting any that die."""
    if port == 0:
        raise ValueError("run_workers needs a fixed port (0 would give each worker its own)")
    reuseport_socket(host, port).close()  # fail here, in one line, if the port is taken
    ctx = mp.get_context("spawn")
    stopping = False

    def stop(_signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}

    def start() -> Any:
        p = ctx.Process(target=_worker, args=(host, port, log_level, access_log), daemon=False)
        p.start()
        return p

    procs = [start() for _ in range(n)]
    try:
        while not stopping:
            time.sleep(0.5)
            for i, p in enumerate(procs):
                if not p.is_alive() and not stopping:
                    logger.warning("worker %s exited with %s; starting another", p.pid, p.exitcode)
                    _forget_metrics(p.pid)
                    procs[i] = start()
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()  # SIGTERM: uvicorn finishes the requests in flight
        deadline = time.monotonic() + 30
        for p in procs:
            p.join(timeout=max(0.1, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join()
        for s, handler in previous.items():
            signal.signal(s, handler)

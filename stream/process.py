"""`streamrec serve` as a child process, for tests, benchmarks and the demo: start it, wait until it answers, stop it.

Not used by the worker itself (stream/worker.py): these are the tools of whoever runs one.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from stream.settings import Settings
from streamrec.errors import UserError


def start_worker(settings: Settings, bundle_dir: Path, log_path: Path | None = None):
    """`streamrec serve` in a child process (its own process group) configured through STREAMREC_* variables."""
    env = dict(os.environ)
    env.update(settings.to_env())
    env["STREAMREC_BUNDLE"] = str(bundle_dir)
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL
    try:
        return subprocess.Popen([sys.executable, "-m", "stream.cli", "serve"], env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    finally:
        if log_path:
            out.close()


def stop_worker(process, timeout: float = 20.0) -> int:
    """SIGTERM (graceful: Faust commits and leaves the group), SIGKILL after ``timeout``; the exit status."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return process.returncode


def wait_until_serving(settings: Settings, process=None, timeout: float = 60.0) -> None:
    """Block until the worker answers: one probe click (an unknown item, session ``streamrec-probe``)
    must come back as an answer on the worker's metrics endpoint. The probe is a real click: it
    is published on the topics and counted like any other."""
    from stream.events import PROBE_SESSION, click_value
    from stream.topics import ensure_topics, producer

    async def send_probe() -> None:
        await ensure_topics(settings)
        p = producer(settings)
        await p.start()
        try:
            await p.send_and_wait(settings.clicks_topic, click_value(PROBE_SESSION, "probe", time.time()), key=PROBE_SESSION.encode())
        finally:
            await p.stop()

    asyncio.run(send_probe())
    url = f"http://{settings.metrics_host}:{settings.metrics_port}/metrics"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise UserError(f"the stream worker exited (status {process.returncode})")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                for line in r.read().decode().splitlines():
                    if line.startswith('streamrec_events_total{outcome="answered"}') and float(line.split()[-1]) >= 1:
                        return
        except OSError:
            pass
        time.sleep(0.1)
    raise UserError(f"the stream worker did not answer within {timeout:.0f}s (metrics at {url})")

"""Stopping the real servers the fixtures start (tritonserver under `fusionrank serve`, Prometheus)."""

from __future__ import annotations

import signal
import subprocess


def stop(proc: subprocess.Popen, timeout: float) -> None:
    """SIGTERM (the graceful stop every server here handles), then SIGKILL when it is not gone within `timeout`."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()

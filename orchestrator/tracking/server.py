"""`orchestrate ui` and the tests' server: `mlflow server` on a local SQLite store."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from methods.config import ConfigError

from .uris import check_tracking_uri, normalize_uri


def start_server(store: str, port: int, host: str = "127.0.0.1") -> subprocess.Popen:
    """`mlflow server` on a SQLite store, in its own process group (stop: `stop_server`). One
    worker and no job runner: it answers in seconds instead of ~half a minute on 2 cores."""
    uri = normalize_uri(store)
    if not uri.startswith("sqlite:///"):
        raise ConfigError(f"{store}: `orchestrate ui` serves a local SQLite store (a folder, *.db or sqlite:/// URI)")
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port), "--workers", "1",
           "--backend-store-uri", uri]
    return subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait_for_server(url: str, proc: subprocess.Popen | None = None, timeout_s: float = 60.0) -> None:
    """Until `url` answers as an MLflow server; raises ConfigError if it dies or never answers."""
    deadline = time.time() + timeout_s
    while True:
        try:
            return check_tracking_uri(url, timeout_s=2)
        except ConfigError:
            if proc is not None and proc.poll() is not None:
                raise ConfigError(f"mlflow server exited: {proc.stderr.read().decode()[-2000:]}") from None
            if time.time() > deadline:
                raise
            time.sleep(0.25)


def stop_server(proc: subprocess.Popen) -> None:
    import signal

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None


def serve_ui(uri_or_store: str, port: int = 5000) -> int:
    """`orchestrate ui`: serve the sweep's store at http://127.0.0.1:PORT until Ctrl+C."""
    if uri_or_store.startswith(("http://", "https://")):
        check_tracking_uri(uri_or_store)
        print(f"MLflow UI: {uri_or_store} (already a server)")
        return 0
    proc = start_server(uri_or_store, port)
    try:
        wait_for_server(f"http://127.0.0.1:{port}", proc)
        print(f"MLflow UI: http://127.0.0.1:{port}  (store {normalize_uri(uri_or_store)}; Ctrl+C stops it)", flush=True)
        proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        stop_server(proc)
    return 0

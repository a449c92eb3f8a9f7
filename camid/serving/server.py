"""`mlflow models serve` on a loopback port, started and stopped from Python (the end-to-end tests, bench/serve.py).

A port that is free when chosen can be taken before the server binds it. So the server is started on a
candidate port, and it counts as ours only once its own log says uvicorn bound that port; if it exits with
"address already in use", another port is tried. Whatever then answers on the port is this server.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from camid.errors import CamidError

HOST = "127.0.0.1"


def candidate_port() -> int:
    """A loopback port free at this moment (the caller must cope with losing it: see `LocalServer`)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class LocalServer:
    """One `mlflow models serve --env-manager local` process; `with LocalServer(...) as url:` or start()/stop()."""

    def __init__(self, model_uri: str, log_file: Path, *, env: dict | None = None, cwd: Path | None = None,
                 workers: int | None = None, timeout_s: int | None = None, attempts: int = 5):
        self.model_uri, self.log_file, self.env, self.cwd = model_uri, Path(log_file), env, cwd
        self.workers, self.timeout_s, self.attempts = workers, timeout_s, attempts
        self.proc: subprocess.Popen | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def _command(self, port: int) -> list[str]:
        mlflow = Path(sys.executable).parent / "mlflow"
        command = [str(mlflow) if mlflow.exists() else "mlflow", "models", "serve", "-m", self.model_uri,
                   "--env-manager", "local", "-h", HOST, "-p", str(port)]
        if self.workers:
            command += ["-w", str(self.workers)]
        if self.timeout_s:
            command += ["-t", str(self.timeout_s)]
        return command

    def start(self, startup_s: float = 600) -> str:
        """Start the server and wait until it answers /ping; its URL. `startup_s` guards against a hang only."""
        import requests

        for _ in range(self.attempts):
            port = candidate_port()
            with open(self.log_file, "w") as log:
                proc = subprocess.Popen(self._command(port), cwd=self.cwd, env=self.env or os.environ.copy(),
                                        stdout=log, stderr=subprocess.STDOUT)
            bound, deadline = f"Uvicorn running on http://{HOST}:{port}", time.monotonic() + startup_s
            while proc.poll() is None and bound not in self._log() and time.monotonic() < deadline:
                time.sleep(0.2)
            if proc.poll() is None and bound in self._log():
                self.proc, self.port = proc, port
                break
            self._end(proc)
            if "address already in use" not in self._log().lower():
                raise CamidError(f"mlflow models serve did not start (log {self.log_file}):\n{self._log()[-3000:]}")
        else:
            raise CamidError(f"mlflow models serve found no free port in {self.attempts} tries")
        while True:  # bound; the workers may still be loading the model
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise CamidError(f"mlflow models serve did not answer /ping (log {self.log_file}):\n"
                                 f"{self._log()[-3000:]}")
            try:
                if requests.get(f"{self.url}/ping", timeout=30).status_code == 200:
                    return self.url
            except requests.RequestException:
                pass
            time.sleep(0.5)

    def _log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    @staticmethod
    def _end(proc: subprocess.Popen) -> None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def stop(self) -> None:
        if self.proc is not None:
            self._end(self.proc)
            self.proc = None

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

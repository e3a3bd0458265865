"""Cog's HTTP server, as the image runs it: a client for one at a URL, and script/serve started in a
subprocess on a free loopback port, waited for and stopped with everything it started.
script/predict and the tests use these."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[2]
STOP_TIMEOUT_SECONDS = 30


class ServerExited(RuntimeError):
    """The server process ended before its setup did."""


class SetupTimeout(RuntimeError):
    """The predictor's setup did not end in time."""


class CogClient:
    """A Cog HTTP server at `url` (http://host:port), started by someone else."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")

    def running(self) -> bool:
        """Whether the server can still answer; a server started elsewhere is assumed to be."""
        return True

    def health(self) -> dict:
        """/health-check: status STARTING, READY, BUSY or SETUP_FAILED, and setup's logs."""
        return requests.get(f"{self.url}/health-check", timeout=10).json()

    def wait_for_setup(self, timeout: float) -> dict:
        """The health answer once setup has ended (READY, BUSY or SETUP_FAILED)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running():
                raise ServerExited("The server exited during setup.")
            try:
                health = self.health()
                if health.get("status") != "STARTING":
                    return health
            except requests.ConnectionError:
                pass  # not listening yet
            time.sleep(0.5)
        raise SetupTimeout(f"The predictor's setup did not finish within {timeout:.0f} s.")

    def input_schema(self) -> dict:
        """The Input properties of the server's OpenAPI schema (what `cog predict` types -i with)."""
        schema = requests.get(f"{self.url}/openapi.json", timeout=30).json()
        return schema["components"]["schemas"]["Input"]["properties"]

    def predict(self, inputs: dict, timeout: float) -> requests.Response:
        """One prediction, answered when it has ended (succeeded, failed or canceled)."""
        return requests.post(f"{self.url}/predictions", json={"input": inputs}, timeout=timeout)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class CogServer(CogClient):
    """script/serve on the weights in `weights`, its output in `log_path`; `env` adds to the
    environment (e.g. TMPDIR)."""

    def __init__(self, weights: Path, log_path: Path, env: dict | None = None):
        port = free_port()
        super().__init__(f"http://127.0.0.1:{port}")
        self.log_path = log_path
        environment = dict(
            os.environ, PORT=str(port), HOST="127.0.0.1", SHOW1_WEIGHTS=str(weights), PYTHON=sys.executable,
            PYTHONUNBUFFERED="1", **(env or {}),
        )
        with open(log_path, "wb") as log:
            # A session of its own: a terminal's Ctrl-C reaches the caller only, which then stops
            # the server in order (stop()), and stop() can end the whole group.
            self.process = subprocess.Popen(
                [str(REPO / "script" / "serve")], cwd=REPO, env=environment, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self):
        """SIGTERM to the server alone: it shuts its worker down in order, so the predictor's exit
        handlers run (predict.py removes its output folder). Whatever is left after that is killed."""
        if self.running():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # the whole group is gone already
        self.process.wait()

"""Cog's HTTP server for the tests: script/lib/cog_server.py's CogServer (what script/predict
starts) with a temp folder of its own, failures as assertions with the server's log, and what the
tests look at: the worker process, the output folder, whether the server is idle."""

import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Appended, so that the repository root (whose predict.py is the predictor) stays ahead of it.
sys.path.append(str(REPO / "script" / "lib"))

from cog_server import CogServer, ServerExited, SetupTimeout, free_port  # noqa: E402

__all__ = ["PREDICTION_TIMEOUT", "STARTUP_TIMEOUT", "ServerUnderTest", "free_port"]

STARTUP_TIMEOUT = 180
PREDICTION_TIMEOUT = 300


class ServerUnderTest(CogServer):
    """script/serve on `weights`, its log and its TMPDIR in `workdir`."""

    def __init__(self, weights: Path, workdir: Path):
        self.tmpdir = workdir / "tmp"
        self.tmpdir.mkdir()
        super().__init__(weights, workdir / "server.log", env={"TMPDIR": str(self.tmpdir)})

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def wait_for_setup(self, timeout=STARTUP_TIMEOUT) -> dict:
        try:
            return super().wait_for_setup(timeout)
        except (ServerExited, SetupTimeout) as error:
            raise AssertionError(f"{error}\n{self.log_tail()}") from None

    def wait_until_idle(self, timeout=30):
        """The server frees its prediction slot just after it has answered, so a client that posts
        again at once can meet 409 "at capacity"; clients wait for READY, as Replicate's queue does."""
        deadline = time.monotonic() + timeout
        while self.health()["status"] == "BUSY":
            assert time.monotonic() < deadline, "the server stayed BUSY"
            time.sleep(0.05)

    def post(self, timeout=PREDICTION_TIMEOUT, wait_until_idle=True, **inputs):
        """One prediction of `inputs`, once the previous one has freed the server."""
        if wait_until_idle:
            self.wait_until_idle()
        return self.predict(inputs, timeout)

    def worker_pid(self) -> int:
        """The worker subprocess that imports predict.py and runs the predictions."""
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            if parent == self.process.pid and b"_run_worker" in cmdline:
                return int(pid)
        raise AssertionError("the Cog worker process was not found")

    def output_dir(self) -> Path:
        (folder,) = self.tmpdir.glob("show1-outputs-*")
        return folder

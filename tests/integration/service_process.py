"""A service run as its own process (`python -m <module>`), so a test can kill -9, freeze, thaw and
start it again on the same port, as an orchestrator or a crash would."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


class ServiceProcess:
    def __init__(self, module: str, env: Mapping[str, str], log_path: Path) -> None:
        self.module = module
        self.env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
        self._log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self._log_path, "ab") as log:
            self._process = subprocess.Popen(
                [sys.executable, "-m", self.module],
                cwd=REPO,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def signal(self, number: signal.Signals) -> None:
        assert self._process is not None
        self._process.send_signal(number)

    def kill9(self) -> None:
        self.signal(signal.SIGKILL)
        assert self._process is not None
        self._process.wait(timeout=10)

    def exit_code(self) -> int | None:
        assert self._process is not None
        return self._process.poll()

    def stop(self) -> None:
        """SIGTERM (after a SIGCONT, in case a test froze it); SIGKILL if it does not end in 10 s."""
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGCONT)
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()

    def log(self) -> str:
        return self._log_path.read_text(errors="replace")

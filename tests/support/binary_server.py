"""A server binary (Prometheus, Alertmanager) run on a free loopback port for a test, always stopped.

Example::

    class MyServer(BinaryServer):
        name = "myserver"
        def arguments(self): return [f"--listen=127.0.0.1:{self.port}"]
"""

from __future__ import annotations

import subprocess
import urllib.request
from pathlib import Path
from typing import TypeVar

from tests.support.net import free_port, wait_until

S = TypeVar("S", bound="BinaryServer")


class BinaryServer:
    """Starts ``binary`` with :meth:`arguments`, waits for ``/-/ready``, stops it at exit."""

    name = "server"

    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary = binary
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_file = self.workdir / f"{self.name}.log"
        self._proc: subprocess.Popen | None = None

    def arguments(self) -> list[str]:
        raise NotImplementedError

    def start(self: S) -> S:
        with open(self.log_file, "wb") as log:
            self._proc = subprocess.Popen(
                [self.binary, *self.arguments()], stdout=log, stderr=subprocess.STDOUT
            )

        def ready() -> bool:
            if self._proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.log_file.read_text()[-2000:]}")
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as response:
                return response.status == 200

        wait_until(ready, 30, what=f"{self.name} /-/ready")
        return self

    def stop(self) -> None:
        if self._proc is None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(5)
        self._proc = None

    def __enter__(self: S) -> S:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

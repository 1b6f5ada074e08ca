"""A real PostgreSQL server for tests: Debian's packages (installed by `make test`), a throwaway cluster in
a temporary folder on a free port, stopped (and stoppable mid-test) by the fixture that owns it."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from service.workers.supervisor import free_port


def _bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        raise RuntimeError("PostgreSQL is not installed: `make test` installs Debian's postgresql package")
    return found[-1]


def _as_postgres(argv: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: drop to its own user when we are root."""
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


@dataclass
class Postgres:
    """A running throwaway cluster."""

    folder: Path
    port: int

    @property
    def data(self) -> Path:
        return self.folder / "data"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def _ctl(self, *args: str) -> None:
        subprocess.run(_as_postgres([_bin("pg_ctl"), "-D", str(self.data), *args]), check=True,
                       capture_output=True, timeout=60)  # fmt: skip

    def start(self) -> None:
        options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._ctl("-o", options, "-l", str(self.folder / "server.log"), "-w", "start")

    def stop(self) -> None:
        self._ctl("-m", "fast", "-w", "stop")

    def create_database(self, name: str) -> str:
        argv = [_bin("createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", name]
        subprocess.run(_as_postgres(argv), check=True, capture_output=True, timeout=60)
        return self.url(name)


@contextlib.contextmanager
def running_postgres() -> Iterator[Postgres]:
    """A fresh cluster, started; removed at the end."""
    folder = Path(tempfile.mkdtemp(prefix="gateway-pg-"))
    try:
        if os.geteuid() == 0:
            shutil.chown(folder, "postgres", "postgres")
        server = Postgres(folder, free_port("127.0.0.1"))
        argv = [_bin("initdb"), "-D", str(server.data), "-U", "postgres", "-A", "trust"]
        subprocess.run(_as_postgres(argv), check=True, capture_output=True, timeout=120)
        server.start()
        try:
            yield server
        finally:
            with contextlib.suppress(subprocess.CalledProcessError):
                server.stop()
    finally:
        shutil.rmtree(folder, ignore_errors=True)

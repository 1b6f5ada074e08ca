"""The database: an engine for the configured URL, migrations run once at start (under a lock, so several
processes or pods starting together migrate once), and a small thread pool so no query runs on the event
loop."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import make_url

log = logging.getLogger(__name__)
T = TypeVar("T")
MIGRATIONS = Path(__file__).with_name("migrations")
MIGRATION_LOCK = 0x6C6C6D67  # a PostgreSQL advisory lock id: "llmg"
SQLITE_BUSY_TIMEOUT_MS = 10_000
CONNECT_TIMEOUT_SECONDS = 5


# Every session on PostgreSQL: a lock or a statement waits a bounded time, and a session idle inside a
# transaction (a pod cut off mid-exchange) is ended by the server, so its row locks never stall the other
# pods' exchanges, revocations and usage writes.
POSTGRES_SESSION = {
    "lock_timeout": "5s",
    "statement_timeout": "30s",
    "idle_in_transaction_session_timeout": "15s",
}


def postgres_connect_args(url: str) -> dict[str, Any]:
    """libpq's connection settings: a database that does not answer must not hold a query thread for
    minutes (TCP's own timeouts); the session limits above unless the URL sets `options` itself."""
    args: dict[str, Any] = {
        "connect_timeout": CONNECT_TIMEOUT_SECONDS,
        "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3,
        "tcp_user_timeout": 15_000,  # ms: data the server never acknowledges fails the query
    }  # fmt: skip
    if "options" not in make_url(url).query:
        args["options"] = " ".join(f"-c {name}={value}" for name, value in POSTGRES_SESSION.items())
    return args


def default_url(cache_dir: Path) -> str:
    """SQLite in the cache folder: nothing to install, shared safely by the processes of one host."""
    return f"sqlite:///{cache_dir / 'gateway.db'}"


def redacted(url: str) -> str:
    """A URL fit for a log line (no password)."""
    return make_url(url).render_as_string(hide_password=True)


class NewerSchema(RuntimeError):
    """The database was migrated by a newer gateway: this one does not know its schema."""


class Database:
    """One engine, its migrations, and the threads its queries run on."""

    def __init__(self, url: str, threads: int = 2) -> None:
        self.url = url
        self.is_sqlite = make_url(url).get_backend_name() == "sqlite"
        if self.is_sqlite:
            path = make_url(url).database
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
        connect_args = {} if self.is_sqlite else postgres_connect_args(url)
        self.engine: Engine = create_engine(url, pool_pre_ping=not self.is_sqlite, connect_args=connect_args)
        if self.is_sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="store")

    def migrate(self) -> None:
        """Bring the schema to the newest revision (idempotent; blocking: call before serving)."""
        with self._migration_lock(), self.engine.begin() as connection:
            if not self.is_sqlite:
                # A migration waits for another pod's and may rewrite big tables: no session limits here.
                connection.execute(text("SET LOCAL lock_timeout = 0"))
                connection.execute(text("SET LOCAL statement_timeout = 0"))
                connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": MIGRATION_LOCK})
            config = Config()
            config.set_main_option("script_location", str(MIGRATIONS))
            config.attributes["connection"] = connection
            try:
                command.upgrade(config, "heads")  # every branch: parallel work may add revisions side by side
            except CommandError as error:
                raise self._newer_schema(connection, config) from error
        log.info("database %s is at the newest schema", redacted(self.url))

    def _newer_schema(self, connection: Connection, config: Config) -> Exception:
        """Why migrating failed, in words: a revision this gateway does not know is a newer gateway's."""
        found = [row[0] for row in connection.execute(text("SELECT version_num FROM alembic_version"))]
        known = ", ".join(ScriptDirectory.from_config(config).get_heads())
        return NewerSchema(
            f"the database {redacted(self.url)} is at schema {', '.join(found) or '(none)'}, which this "
            f"gateway (newest schema {known}) does not know: a newer gateway migrated it. Run that version, "
            "or give this one a database of its own (GATEWAY_DATABASE_URL)."
        )

    @contextlib.contextmanager
    def _migration_lock(self) -> Iterator[None]:
        """SQLite has no advisory locks: processes of one host take a file lock beside the database."""
        path = make_url(self.url).database if self.is_sqlite else None
        if not path or path == ":memory:":
            yield
            return
        with open(f"{path}.migrate-lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def transaction(self) -> contextlib.AbstractContextManager[Connection]:
        """A connection in a transaction (committed on success), for use in `run`'s threads."""
        return self.engine.begin()

    async def run(self, work: Callable[..., T], *args: Any) -> T:
        """`work(*args)` on the store's threads, awaited from the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, work, *args)

    def close(self) -> None:
        """Let go of the engine; a query still hanging on a database that stopped answering is not waited
        for (its thread ends with it)."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.engine.dispose()


def _sqlite_pragmas(connection: Any, _record: Any) -> None:
    """WAL: readers never wait for a writer; a busy timeout instead of 'database is locked' at once."""
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()

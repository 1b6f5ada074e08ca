"""Usage a gateway process could not write to the store before it stopped (the database was away), kept on
its own disk until a process with the same cache folder and store writes it.

One file per stopped process, `<cache>/usage-spool/<store>-<holder>.json`, written atomically (a temporary
file renamed). `<store>` names the database (a hash of its URL without the password), so a spool is only
ever written to the store it belongs to. Writing a spool again is harmless: usage rows are keyed by their
process (`holder`) and hold absolute totals, so the same rows written twice leave the same totals. A file is
deleted only after the store committed its rows.

A spool is written only as its own process's rows (every row names the holder in its file name), and a
write never lowers a stored total (`service.store.usage`): folded late, after its process wrote newer
totals, or made up, a spool cannot take usage away. Only regular files are read (no link, pipe or device),
at most the size a spool can have. A temporary file left by a process that died while writing its spool is
deleted once it is an hour old. Spools of another store (the same database under another URL, say) are
left alone, and logged once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import stat
import time
from datetime import date
from pathlib import Path
from typing import Any

from sqlalchemy.exc import DataError, IntegrityError

from service.store.database import Database, redacted
from service.store.usage import COUNTS, write_usage

log = logging.getLogger(__name__)
FOLDER = "usage-spool"
ROW_BYTES = 1024  # a spooled row is far smaller: a larger file is no spool of ours, and is left alone
HOLDER = re.compile(r"[0-9a-f]{32}")  # a process's holder id (uuid4 hex), matched whole
STALE_TEMPORARY_SECONDS = 3600.0  # a spool is written in milliseconds: an older temporary file is debris


class UsageSpool:
    """The spool files of one store in one cache folder."""

    def __init__(self, cache_dir: Path, store_url: str, max_rows: int) -> None:
        self.folder = cache_dir / FOLDER
        self.store = hashlib.sha256(redacted(store_url).encode()).hexdigest()[:16]
        self.max_bytes = max(1, max_rows) * ROW_BYTES
        self._told_of_others = False

    async def keep_unwritten(self, holder: str, rows: list[dict[str, Any]]) -> None:
        """Stopping with the database away: what it does not have goes to this process's spool (logged)."""
        if not rows:
            return
        try:
            path = await asyncio.to_thread(self.keep, holder, rows)
        except OSError as exc:
            log.error("stopping without writing %d usage row(s): the database is unreachable and the "
                      "spool cannot be written (%s)", len(rows), exc)  # fmt: skip
            return
        log.warning("the database is unreachable: %d usage row(s) kept in %s, written to the database by "
                    "the next gateway started with this cache folder", len(rows), path)  # fmt: skip

    async def write(self, database: Database) -> bool:
        """Write every spool of this store to it (on the store's threads); whether the store was reached."""
        try:
            written = await database.run(self.fold, database)
        except Exception as exc:
            log.warning("usage spools not written yet: %s: %.200s", type(exc).__name__, exc)
            return False
        if written:
            log.info("%d usage row(s) spooled by stopped processes written to the database", written)
        return True

    def keep(self, holder: str, rows: list[dict[str, Any]]) -> Path:
        """Write a stopping process's unwritten usage rows (blocking: run it on a thread)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{self.store}-{holder}.json"
        temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        shown = [{**row, "day": row["day"].isoformat()} for row in rows]
        try:
            with open(temporary, "w") as handle:
                json.dump({"rows": shown}, handle)
                handle.flush()
                os.fsync(handle.fileno())  # the rename must never expose a file the disk does not hold
            os.replace(temporary, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                temporary.unlink()
        return path

    def fold(self, database: Database) -> int:
        """Write every spool of this store to it, each file deleted once committed; the rows written
        (blocking: run it on the store's threads)."""
        written = 0
        self._sweep_temporaries()
        self._tell_of_others()
        for path in sorted(self.folder.glob(f"{self.store}-*.json")):
            rows = self._read(path)
            if rows is None:
                continue
            try:
                with database.transaction() as connection:
                    write_usage(connection, rows)
            except (DataError, IntegrityError, OverflowError) as exc:  # the rows, not the store: set aside
                _set_aside(path, f"the store refused its rows: {type(exc).__name__}")
                continue
            with contextlib.suppress(FileNotFoundError):  # another process folded it too: same totals
                path.unlink()
            written += len(rows)
        return written

    def _sweep_temporaries(self) -> None:
        """Delete the temporary files of spools whose writer died before renaming them."""
        old = time.time() - STALE_TEMPORARY_SECONDS
        for temporary in self.folder.glob(f"{self.store}-*.json.*.tmp"):
            with contextlib.suppress(OSError):
                if temporary.stat().st_mtime < old:
                    temporary.unlink()
                    log.info("deleted %s, a usage spool its process never finished writing", temporary)

    def _tell_of_others(self) -> None:
        """Log once that spools of another store wait here (a gateway started with that URL writes them)."""
        if self._told_of_others:
            return
        others = [p for p in self.folder.glob("*.json") if not p.name.startswith(f"{self.store}-")]
        if others:
            self._told_of_others = True
            log.warning("%d usage spool(s) in %s belong to another database URL: only a gateway started "
                        "with that URL writes them", len(others), self.folder)  # fmt: skip

    def _read(self, path: Path) -> list[dict[str, Any]] | None:
        """A spool's rows, or None (logged) when it cannot be one."""
        try:
            holder = _holder_of(path, self.store)
            if not HOLDER.fullmatch(holder):
                raise ValueError(f"its name does not end with a process's holder id: {holder[:64]!r}")
            rows = [_row(found) for found in json.loads(self._contents(path))["rows"]]
            if any(found["holder"] != holder for found in rows):
                raise ValueError("a row names another process than the file does")
        except FileNotFoundError:
            return None  # folded meanwhile by another process
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
            _set_aside(path, f"it is not readable: {type(exc).__name__}: {str(exc)[:200]}")
            return None
        return rows

    def _contents(self, path: Path) -> bytes:
        """A regular file's bytes, at most `max_bytes` (a link, a pipe or a device is refused unread)."""
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK), "rb") as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                raise ValueError("not a regular file")
            contents = handle.read(self.max_bytes + 1)
        if len(contents) > self.max_bytes:
            raise ValueError(f"larger than {self.max_bytes} bytes")
        return contents


def _holder_of(path: Path, store: str) -> str:
    """The holder a spool file is named after: `<store>-<holder>.json`."""
    return path.name.removeprefix(f"{store}-").removesuffix(".json")


def _set_aside(path: Path, why: str) -> None:
    """A spool that cannot be written is renamed `*.bad` (logged once; the others are still written, and
    an operator can look at it) rather than read again after every exchange."""
    with contextlib.suppress(OSError):
        path.rename(path.with_name(path.name + ".bad"))
    log.error("usage spool %s set aside as %s.bad, not written: %s", path, path.name, why)


def _row(found: dict[str, Any]) -> dict[str, Any]:
    """One `usage` row from its JSON form (refusing anything else)."""
    row: dict[str, Any] = {name: str(found[name]) for name in ("key_id", "model", "holder")}
    row["day"] = date.fromisoformat(found["day"])
    for name in COUNTS:
        value = found[name]
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} is {value!r}, not a count")
        row[name] = value
    return row

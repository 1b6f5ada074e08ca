from __future__ import annotations

import time
from pathlib import Path

from service.workers.worker_log import log_tail


def test_the_tail_is_read_from_the_end_of_a_large_log(tmp_path: Path) -> None:
    path = tmp_path / "w.log"
    with path.open("w") as handle:
        for index in range(400_000):  # ~10 MB
            handle.write(f"line {index} {'x' * 12}\n")
    started = time.perf_counter()
    tail = log_tail(path, lines=3)
    took = time.perf_counter() - started
    assert tail == "".join(f"line {i} {'x' * 12}\n" for i in (399_997, 399_998, 399_999))
    assert took < 0.05  # reads the end only (the whole file takes far longer)


def test_a_missing_log_has_an_empty_tail(tmp_path: Path) -> None:
    assert log_tail(tmp_path / "none.log") == ""

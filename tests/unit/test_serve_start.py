"""What `serve` does before the app exists: an operator-given metrics folder is emptied by a gateway
serving alone (never by a supervisor's serving process)."""

from __future__ import annotations

import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service.api import server
from service.ops.settings import ModelKind, ModelSpec, Settings

EXTERNAL = ModelSpec(name="x", kind=ModelKind.BASE, tokenizer="t", urls=["http://w:8000"])  # type: ignore[list-item]


class Started(Exception):
    """Raised where the app would be built: what `serve` had done by then is what is checked."""


@pytest.fixture
def metrics_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "metrics"
    folder.mkdir()
    (folder / "counter_4242.db").write_bytes(b"an earlier run's counts")
    (folder / "notes.txt").write_text("not ours")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(folder))
    return folder


@pytest.fixture
def built(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Settings]]:
    """The settings `serve` builds its app with (and stops there)."""
    seen: list[Settings] = []

    def create_app(settings: Settings) -> Any:
        seen.append(settings)
        raise Started

    monkeypatch.setattr(server, "create_app", create_app)
    monkeypatch.setattr(server, "configure_logging", lambda *args: None)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield seen
    for sig, handler in handlers.items():  # serve installs its own before building the app
        signal.signal(sig, handler)


def test_a_gateway_serving_alone_forgets_an_earlier_runs_metrics(
    metrics_dir: Path, built: list[Settings]
) -> None:
    with pytest.raises(Started):
        server.serve(Settings(models=[EXTERNAL], processes=1))
    assert sorted(p.name for p in metrics_dir.iterdir()) == ["notes.txt"]


def test_a_supervisors_serving_process_leaves_the_shared_folder(
    metrics_dir: Path, built: list[Settings]
) -> None:
    with socket.socket() as inherited, pytest.raises(Started):
        server.serve(Settings(models=[EXTERNAL], processes=1), inherited)
    assert sorted(p.name for p in metrics_dir.iterdir()) == ["counter_4242.db", "notes.txt"]

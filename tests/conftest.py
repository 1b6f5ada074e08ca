"""Shared fixtures: a clean GATEWAY_* environment for every test."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.gateway_process import TEST_STORE


def pytest_configure(config: pytest.Config) -> None:
    """The same for fixtures that outlive a test (set up before any test's own fixtures run)."""
    for name in [name for name in os.environ if name.startswith("GATEWAY_")]:
        del os.environ[name]
    os.environ["GATEWAY_DATABASE_URL"] = TEST_STORE


@pytest.fixture(autouse=True)
def clean_gateway_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No GATEWAY_* variable from the caller's shell leaks into a test; the store is the suite's."""
    for name in list(os.environ):
        if name.startswith("GATEWAY_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("GATEWAY_DATABASE_URL", TEST_STORE)
    yield


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything under tests/e2e runs against the real embedded stack."""
    for item in items:
        if "/tests/e2e/" in str(item.path):
            item.add_marker(pytest.mark.e2e)

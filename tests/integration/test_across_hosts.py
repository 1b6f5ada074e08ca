"""Workers on separate test hosts (network namespaces joined to this one by veth links): real
requests reach each; cutting one host's link makes the gateway stop sending to it within one
health interval while requests keep succeeding; restoring the link brings it back.

Stand-in workers play the remote vLLM servers here: this test is about the network failing, and
the real workers' behaviour is covered by tests/e2e."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from service.api.app import create_app
from tests.integration.conftest import serve_in_thread, standin_settings

STANDIN = Path(__file__).with_name("standin.py")
HEALTH_INTERVAL = 0.5
HEALTH_TIMEOUT = 0.3


@dataclass
class NetHost:
    name: str
    link: str  # this side of the veth pair
    address: str
    server: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.address}:8000"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def _namespaces_allowed() -> str | None:
    """Why namespaces can't be made here, or None when they can."""
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is missing"
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = subprocess.run(["ip", "netns", "add", "gwtest-probe"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"this machine refuses network namespaces: {probe.stderr.strip()}"
    _ip("netns", "delete", "gwtest-probe")
    return None


@pytest.fixture(scope="module")
def hosts() -> Iterator[list[NetHost]]:
    refused = _namespaces_allowed()
    if refused is not None:
        pytest.fail(f"cannot build test hosts: {refused}")  # said plainly, never faked
    made = [NetHost(f"gwtest-{i}", f"gwveth{i}", f"10.231.{i}.2") for i in (1, 2)]
    try:
        for i, host in enumerate(made, start=1):
            _ip("netns", "add", host.name)
            _ip("link", "add", host.link, "type", "veth", "peer", "name", "eth0", "netns", host.name)
            _ip("addr", "add", f"10.231.{i}.1/24", "dev", host.link)
            _ip("link", "set", host.link, "up")
            _ip("-n", host.name, "addr", "add", f"{host.address}/24", "dev", "eth0")
            _ip("-n", host.name, "link", "set", "eth0", "up")
            _ip("-n", host.name, "link", "set", "lo", "up")
            command = [
                "ip",
                "netns",
                "exec",
                host.name,
                sys.executable,
                str(STANDIN),
                "--host",
                host.address,
                "--port",
                "8000",
            ]
            host.server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for host in made:
            _wait_until_up(host)
        yield made
    finally:
        for host in made:
            if host.server is not None:
                host.server.terminate()
                host.server.wait(timeout=30)
            subprocess.run(["ip", "link", "delete", host.link], capture_output=True)
            subprocess.run(["ip", "netns", "delete", host.name], capture_output=True)


def _wait_until_up(host: NetHost) -> None:
    for _ in range(300):
        try:
            if httpx.get(f"{host.url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise AssertionError(f"stand-in on {host.name} did not start")


def _send_and_read_worker_up(http: httpx.Client, count: int) -> dict[str, int]:
    seen: dict[str, int] = {}
    for _ in range(count):
        response = http.post("/complete", json={"model": "base", "prompt": "x", "return_token_ids": True})
        assert response.status_code == 200, response.text
    samples = http.get("/metrics").text
    for line in samples.splitlines():
        if line.startswith("gateway_worker_up{") and 'model="base"' in line:
            worker = line.split('worker="')[1].split('"')[0]
            seen[worker] = int(float(line.rsplit(" ", 1)[1]))
    return seen


def test_workers_on_other_hosts_are_balanced_cut_off_and_rejoined(hosts: list[NetHost]) -> None:
    settings = standin_settings(*(h.url for h in hosts), health_interval=HEALTH_INTERVAL,
                                health_timeout=HEALTH_TIMEOUT, connect_timeout=0.3)  # fmt: skip
    app = create_app(settings)
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=10) as http:
        deadline = time.monotonic() + 10
        while http.get("/ready").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        pool = app.state.gateway.pools["base"]
        before = {w.label: w.picked for w in pool.workers}
        assert _send_and_read_worker_up(http, 6) == {"10.231.1.2:8000": 1, "10.231.2.2:8000": 1}
        assert all(w.picked > before[w.label] for w in pool.workers)  # both hosts got requests

        cut, other = hosts[0], hosts[1]
        _ip("link", "set", cut.link, "down")
        cut_at = time.monotonic()
        while next(w for w in pool.workers if w.url == cut.url).healthy:
            assert time.monotonic() - cut_at < HEALTH_INTERVAL + HEALTH_TIMEOUT + 0.5, (
                "still routed to the cut host"
            )
            time.sleep(0.02)
        for _ in range(6):  # requests keep succeeding, all on the other host
            response = http.post("/complete", json={"model": "base", "prompt": "x"})
            assert response.status_code == 200
        survivor = next(w for w in pool.workers if w.url == other.url)
        assert survivor.outstanding == 0 and survivor.healthy

        _ip("link", "set", cut.link, "up")
        deadline = time.monotonic() + 10
        while not next(w for w in pool.workers if w.url == cut.url).healthy:
            assert time.monotonic() < deadline, "the host did not rejoin"
            time.sleep(0.05)
        rejoined = next(w for w in pool.workers if w.url == cut.url)
        picked = rejoined.picked
        for _ in range(4):
            assert http.post("/complete", json={"model": "base", "prompt": "x"}).status_code == 200
        assert rejoined.picked > picked  # traffic reaches it again

"""Several gateway processes on one port (GATEWAY_PROCESSES=2): one supervises the embedded worker (a
stand-in engine here) and the others follow its roster; metrics are merged; a dead serving process
or worker is replaced; SIGTERM drains every process and leaves nothing behind."""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.parser import text_string_to_metric_families

from service.ops.settings import Settings
from tests.gateway_process import Stack, launch, stop, wait_ready
from tests.helpers import wait_until
from tests.integration.conftest import TOKENIZER

STANDIN = Path(__file__).with_name("standin.py")
PROMPT = {"model": "fake", "prompt": "Hello", "max_tokens": 4}


def tree(gateway: Stack) -> list[psutil.Process]:
    return psutil.Process(gateway.process.pid).children(recursive=True)


def running(gateway: Stack, marker: str) -> list[psutil.Process]:
    found = []
    for process in tree(gateway):
        try:
            if marker in " ".join(process.cmdline()):
                found.append(process)
        except psutil.Error:  # gone, or a zombie not yet reaped
            continue
    return found


def serving(gateway: Stack) -> list[psutil.Process]:
    return running(gateway, "service.api.processes")


def engines(gateway: Stack) -> list[psutil.Process]:
    return running(gateway, str(STANDIN))


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    folder = tmp_path_factory.mktemp("processes")
    engine = folder / "fake-python"
    engine.write_text(f'#!/bin/sh\nshift 2\nexec {sys.executable} {STANDIN} "$@"\n')
    engine.chmod(0o755)
    model = {
        "name": "fake",
        "kind": "base",
        "source": str(folder),
        "tokenizer": Settings().resolve_source(TOKENIZER),
    }
    env = {
        "GATEWAY_PROCESSES": "2", "GATEWAY_MODELS": json.dumps([model]),
        "GATEWAY_ENGINE_PYTHON": str(engine), "GATEWAY_CACHE_DIR": str(folder),
        "GATEWAY_HEALTH_INTERVAL": "0.2", "GATEWAY_RESTART_BACKOFF_INITIAL": "0.2",
        "GATEWAY_DRAIN_ACCEPT_WINDOW": "1", "GATEWAY_LOG_FORMAT": "text",
    }  # fmt: skip
    started = launch(env, folder / "gateway.log")
    try:
        wait_ready(started, seconds=60)
        yield started
    finally:
        stop(started)


def complete(gateway: Stack) -> httpx.Response:
    return httpx.post(f"{gateway.url}/v1/completions", json=PROMPT, timeout=10)  # a new connection each


def served_by(gateway: Stack, client_port: int) -> int:
    """The serving process holding the gateway's end of the client connection from `client_port`
    (request ids are random: they do not say which process served)."""
    for process in serving(gateway):
        with contextlib.suppress(psutil.Error):
            if any(c.raddr and c.raddr.port == client_port for c in process.net_connections("tcp")):
                return process.pid
    raise AssertionError(f"no serving process holds the connection from port {client_port}")


def complete_where(gateway: Stack) -> tuple[httpx.Response, int]:
    """A completion on a new connection, and the serving process that answered it."""
    with httpx.Client(base_url=gateway.url, timeout=10) as client:
        answer = client.post("/v1/completions", json=PROMPT)
        port = answer.extensions["network_stream"].get_extra_info("client_addr")[1]
        return answer, served_by(gateway, port)


def requests_counted(gateway: Stack) -> float:
    text = httpx.get(f"{gateway.url}/metrics", timeout=5).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "gateway_requests_total" and sample.labels.get("endpoint") == "v1_completions"
    )


def test_two_processes_serve_one_port_with_one_supervising_the_worker(gateway: Stack) -> None:
    assert len(serving(gateway)) == 2 and len(engines(gateway)) == 1
    before = requests_counted(gateway)
    answers = [complete_where(gateway) for _ in range(40)]
    assert all(answer.status_code == 200 for answer, _ in answers)
    processes = {pid for _, pid in answers}
    assert len(processes) == 2, processes  # both processes answered
    assert requests_counted(gateway) - before == 40  # one /metrics shows both processes' requests


def test_a_restarted_worker_is_followed_by_every_process(gateway: Stack) -> None:
    (engine,) = engines(gateway)
    old_port = engine.cmdline()[engine.cmdline().index("--port") + 1]
    engine.kill()
    wait_until(lambda: [p.pid for p in engines(gateway)] not in ([], [engine.pid]), 30)
    (new,) = engines(gateway)
    assert new.cmdline()[new.cmdline().index("--port") + 1] != old_port
    wait_ready(gateway, seconds=60)
    wait_until(lambda: all(complete(gateway).status_code == 200 for _ in range(10)), 30)
    answers = [complete_where(gateway) for _ in range(20)]
    assert [a.status_code for a, _ in answers] == [200] * 20
    assert len({pid for _, pid in answers}) == 2  # both found the new port


def test_a_serving_process_that_dies_is_replaced(gateway: Stack) -> None:
    victim = serving(gateway)[0]
    victim.kill()
    wait_until(lambda: len(serving(gateway)) == 2 and victim.pid not in {p.pid for p in serving(gateway)}, 30)
    wait_until(lambda: all(complete(gateway).status_code == 200 for _ in range(10)), 30)
    assert "exited with -9; starting it again" in gateway.log()


def test_sigterm_drains_every_process_and_leaves_nothing(gateway: Stack) -> None:
    processes = tree(gateway)
    roster = next(Path(p.environ()["GATEWAY_ROSTER_FILE"]) for p in serving(gateway))
    assert roster.exists()
    gateway.process.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    assert httpx.get(f"{gateway.url}/ready", timeout=5).status_code == 503  # load balancers: go elsewhere
    assert complete(gateway).status_code == 200  # ...but requests are still served meanwhile
    assert gateway.process.wait(timeout=30) == 0
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in processes)
    assert not roster.parent.exists()
    assert "gateway stopped: 2 serving processes, 1 workers" in gateway.log()


# Limits shared by the processes (issue 19): a second 2-process gateway with keys, a rate limit, a
# failed-key limit, two slots per worker, a queue of one, and a slow model.
SLOW_SECONDS = 2.0
KEYS = ("key-rate", "key-slots", "key-kill", "key-throttle")


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    folder = tmp_path_factory.mktemp("shared")
    engine = folder / "fake-python"
    engine.write_text(f'#!/bin/sh\nshift 2\nexec {sys.executable} {STANDIN} "$@"\n')
    engine.chmod(0o755)
    tokenizer = Settings().resolve_source(TOKENIZER)
    models = [
        {"name": "fake", "kind": "base", "source": str(folder), "tokenizer": tokenizer},
        {"name": "slow", "kind": "base", "source": str(folder), "tokenizer": tokenizer,
         "engine_env": {"STANDIN_FIRST_TOKEN_DELAY": str(SLOW_SECONDS)}},
    ]  # fmt: skip
    metrics = folder / "metrics"
    metrics.mkdir()
    stale = MmapedDict(str(metrics / "counter_999999.db"))  # an earlier run's counts
    stale.write_value(mmap_key("gateway_requests_total", "gateway_requests_total", ["endpoint", "model",
                      "status"], ["v1_completions", "fake", "200"], "Finished requests"), 1e6, 0)  # fmt: skip
    stale.close()
    env = {
        "GATEWAY_PROCESSES": "2", "GATEWAY_MODELS": json.dumps(models),
        "GATEWAY_ENGINE_PYTHON": str(engine), "GATEWAY_CACHE_DIR": str(folder),
        "GATEWAY_HEALTH_INTERVAL": "0.2", "GATEWAY_RESTART_BACKOFF_INITIAL": "0.2",
        "GATEWAY_DRAIN_ACCEPT_WINDOW": "1", "GATEWAY_LOG_FORMAT": "text",
        "GATEWAY_API_KEYS": ",".join(KEYS), "GATEWAY_RATE_LIMIT": "10/minute",
        "GATEWAY_AUTH_FAILURE_LIMIT": "3", "GATEWAY_MAX_IN_FLIGHT_PER_WORKER": "2",
        "GATEWAY_MAX_QUEUE_PER_MODEL": "1", "GATEWAY_QUEUE_TIMEOUT": "10",
        "GATEWAY_METRICS_REQUIRE_KEY": "false", "PROMETHEUS_MULTIPROC_DIR": str(metrics),
    }  # fmt: skip
    started = launch(env, folder / "gateway.log")
    try:
        wait_ready(started, seconds=60)
        yield started
    finally:
        stop(started)


@dataclass
class Pinned:
    """One keep-alive connection, served by one process for as long as it stays open."""

    client: httpx.Client
    process: int  # the serving process that serves it
    port: int  # the connection's local port

    def post(self, key: str, model: str = "fake") -> tuple[httpx.Response, float]:
        """A completion with `key`; the answer and when it arrived (monotonic)."""
        body = {"model": model, "prompt": "Hello", "max_tokens": 4}
        answer = self.client.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"})
        return answer, time.monotonic()


def pinned(gateway: Stack, count: int, source: str = "127.0.0.1") -> dict[int, list[Pinned]]:
    """Connections from `source` until each of the two serving processes has `count` of them (a
    process just started takes connections once it serves)."""
    found: dict[int, list[Pinned]] = {}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        transport = httpx.HTTPTransport(local_address=source)
        client = httpx.Client(base_url=gateway.url, transport=transport, timeout=30)
        answer = client.get("/health")
        port = answer.extensions["network_stream"].get_extra_info("client_addr")[1]
        process = served_by(gateway, port)
        if len(found.setdefault(process, [])) < count:
            found[process].append(Pinned(client, process, port))
        else:
            client.close()
            time.sleep(0.05)
        if len(found) == 2 and all(len(group) == count for group in found.values()):
            return found
    close_all(found)
    pytest.fail(f"the kernel gave every connection to one process: {list(found)}")


def close_all(groups: dict[int, list[Pinned]]) -> None:
    for group in groups.values():
        for connection in group:
            connection.client.close()


def together(*calls: Callable[[], tuple[httpx.Response, float]]) -> list[tuple[httpx.Response, float]]:
    with ThreadPoolExecutor(len(calls)) as pool:
        return [future.result() for future in [pool.submit(call) for call in calls]]


def test_one_connection_gets_a_key_s_whole_rate_limit(shared: Stack) -> None:
    groups = pinned(shared, 1)
    try:
        connection = next(iter(groups.values()))[0]
        statuses = [connection.post("key-rate")[0].status_code for _ in range(10)]
        assert statuses == [200] * 10  # not 10 / 2 processes
        limited, _ = connection.post("key-rate")
        assert limited.status_code == 429 and 1 <= int(limited.headers["retry-after"]) <= 61
        other = next(group for prefix, group in groups.items() if prefix != connection.process)[0]
        assert other.post("key-rate")[0].status_code == 429  # the other process counts the same hits
    finally:
        close_all(groups)


def test_a_worker_s_slots_and_a_model_s_queue_hold_across_processes(shared: Stack) -> None:
    groups = pinned(shared, 3)
    try:
        (first, second, third), (elsewhere, *_) = groups.values()
        started = time.monotonic()
        with ThreadPoolExecutor(4) as pool:
            # Both slots taken through one process (split per process, it would have had only one).
            held = [pool.submit(c.post, "key-slots", "slow") for c in (first, second)]
            time.sleep(0.5)
            waiting = pool.submit(elsewhere.post, "key-slots", "slow")  # the other process: waits
            time.sleep(0.5)
            full, _ = third.post("key-slots", "slow")  # the one queue place is taken, in the other process
            answers = [future.result() for future in (*held, waiting)]
        assert full.status_code == 503 and "queue is full" in full.json()["error"]["message"]
        assert [answer.status_code for answer, _ in answers] == [200, 200, 200]
        (_, first_done), (_, second_done), (_, waited_done) = answers
        assert max(first_done, second_done) - started < 1.6 * SLOW_SECONDS  # both admitted at once
        assert waited_done - min(first_done, second_done) > SLOW_SECONDS / 2  # it waited for a slot
    finally:
        close_all(groups)


def test_a_killed_serving_process_gives_back_the_slots_it_held(shared: Stack) -> None:
    groups = pinned(shared, 2)
    try:
        victim_connections = next(iter(groups.values()))
        ports = {connection.port for connection in victim_connections}
        (victim,) = [p for p in serving(shared) if any(c.laddr.port == shared_port(shared) and c.raddr
                     and c.raddr.port in ports for c in p.net_connections("tcp"))]  # fmt: skip
        with ThreadPoolExecutor(2) as pool:
            for connection in victim_connections:
                pool.submit(connection.post, "key-kill", "slow")
            time.sleep(0.7)  # both slots held
            victim.kill()
    finally:
        close_all(groups)
    wait_until(lambda: len(serving(shared)) == 2 and victim.pid not in {p.pid for p in serving(shared)}, 30)
    wait_ready(shared, seconds=60)
    fresh = pinned(shared, 1)
    try:
        started = time.monotonic()
        answers = together(*(lambda c=group[0]: c.post("key-kill", "slow") for group in fresh.values()))
        assert [answer.status_code for answer, _ in answers] == [200, 200]
        assert max(done for _, done in answers) - started < 1.6 * SLOW_SECONDS  # none waited for a slot
    finally:
        close_all(fresh)


def test_failed_keys_are_counted_across_processes_per_address(shared: Stack) -> None:
    groups = pinned(shared, 2, source="127.0.0.3")
    neighbour = pinned(shared, 1, source="127.0.0.4")
    try:
        (here, here_again), (there, _) = groups.values()
        for connection in (here, there, here):
            assert connection.post("wrong-key")[0].status_code == 401
        refused, _ = here_again.post("key-throttle")  # a good key, but not even compared
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "too_many_failed_attempts"
        assert 55 <= int(refused.headers["retry-after"]) <= 61
        assert there.post("key-throttle")[0].status_code == 429
        for group in neighbour.values():  # another address, through either process
            assert group[0].post("key-throttle")[0].status_code == 200
        text = httpx.get(f"{shared.url}/metrics", timeout=5).text
        assert sample(text, "gateway_auth_failures_total") == 3
        assert sample(text, "gateway_auth_throttled_total") == 2
    finally:
        close_all(groups)
        close_all(neighbour)


def test_an_earlier_run_s_metric_files_are_gone(shared: Stack) -> None:
    metrics = Path(shared.log_path).parent / "metrics"
    assert not (metrics / "counter_999999.db").exists()
    assert sample(httpx.get(f"{shared.url}/metrics", timeout=5).text, "gateway_requests_total") < 1e6


def shared_port(gateway: Stack) -> int:
    return int(gateway.url.rsplit(":", 1)[1])


def sample(text: str, name: str) -> float:
    """The sum of a metric's samples across label sets."""
    return sum(
        s.value for family in text_string_to_metric_families(text) for s in family.samples if s.name == name
    )

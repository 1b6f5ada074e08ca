"""Adapters onto workers through vLLM's runtime API: one load per worker and adapter however many requests
need it, "already loaded" by another gateway process counted as loaded (from the same folder only),
failures counted and explained, and what a worker lists and runs read from its own answers."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from service.errors import AdapterLoadFailed
from service.ops.lora import UNSERVABLE, folder_files
from service.ops.metrics import Metrics
from service.workers import lora as lora_loads
from service.workers.engine_metrics import parse_engine_load
from service.workers.facts import read_model_entry
from service.workers.fake import FakeTransport
from service.workers.lora import LOAD_PATH, UNLOAD_PATH, AdapterLoads, FolderWatch, LoraTarget, Outcome
from service.workers.worker import Worker
from tests.adapters import adapter_folder
from tests.promtext import parse, value

QA = LoraTarget("qa", "/adapters/qa", "gemma")


class FakeVllm:
    """vLLM's LoRA routes as `OpenAIServingModels` answers them, over a FakeTransport: loads take
    `delay` seconds; a missing folder is a 404; a name it holds is a 400."""

    def __init__(self, fake: FakeTransport, worker: Worker, folders: set[str], delay: float = 0.0) -> None:
        self.held: dict[str, str] = {}
        self.loads = 0
        self.folders, self.delay = folders, delay
        fake.posts[(worker.url, LOAD_PATH)] = self.load
        fake.posts[(worker.url, UNLOAD_PATH)] = self.unload
        fake.facts[(worker.url, "/v1/models")] = self.models

    async def load(self, body: dict[str, Any]) -> tuple[int, Any]:
        self.loads += 1
        await asyncio.sleep(self.delay)
        name, path = body["lora_name"], body["lora_path"]
        if name in self.held:
            message = f"The lora adapter '{name}' has already been loaded. If you want to load the adapter..."
            return 400, {"error": {"message": message, "type": "InvalidUserInput", "code": 400}}
        if path not in self.folders:
            message = f"Loading lora {name} failed: No adapter found for {path}"
            return 404, {"error": {"message": message, "type": "NotFoundError", "code": 404}}
        self.held[name] = path
        return 200, f"Success: LoRA adapter '{name}' added successfully."

    def unload(self, body: dict[str, Any]) -> tuple[int, Any]:
        if self.held.pop(body["lora_name"], None) is None:
            return 404, {"error": {"message": "cannot be found", "type": "NotFoundError", "code": 404}}
        return 200, "Success"

    def models(self) -> dict[str, Any]:
        base = {"id": "gemma", "root": "/models/gemma", "parent": None, "max_model_len": 2048}
        entries = [{"id": name, "root": path, "parent": "gemma"} for name, path in self.held.items()]
        return {"object": "list", "data": [base, *entries]}


def loads_of(metrics: Metrics, outcome: str) -> float:
    samples = parse(metrics.exposition().decode())
    return value(samples, "gateway_adapter_loads_total", model="gemma", adapter="qa", outcome=outcome)


@pytest.fixture
def worker() -> Worker:
    return Worker("gemma", "http://w0", name="gemma-0", up=True)


async def test_requests_needing_the_same_adapter_wait_for_one_load(worker: Worker) -> None:
    fake, metrics = FakeTransport(), Metrics(lambda: [])
    vllm = FakeVllm(fake, worker, {QA.path}, delay=0.05)
    loads = AdapterLoads(fake, metrics)
    outcomes = await asyncio.gather(*(loads.ensure(worker, QA) for _ in range(10)))
    assert vllm.loads == 1 and set(outcomes) == {Outcome.LOADED}
    assert worker.adapters == {"qa": "/adapters/qa"}
    assert await loads.ensure(worker, QA) is None  # held: nothing asked of the worker
    assert vllm.loads == 1 and loads_of(metrics, "loaded") == 1


async def test_a_caller_that_leaves_does_not_cancel_the_load_others_wait_for(worker: Worker) -> None:
    fake = FakeTransport()
    vllm = FakeVllm(fake, worker, {QA.path}, delay=0.1)
    loads = AdapterLoads(fake)
    leaving = asyncio.ensure_future(loads.ensure(worker, QA))
    staying = asyncio.ensure_future(loads.ensure(worker, QA))
    await asyncio.sleep(0.02)
    leaving.cancel()
    assert await staying is Outcome.LOADED and vllm.held == {"qa": QA.path}


async def test_already_loaded_by_another_process_counts_as_loaded(worker: Worker) -> None:
    fake, metrics = FakeTransport(), Metrics(lambda: [])
    vllm = FakeVllm(fake, worker, {QA.path})
    vllm.held["qa"] = QA.path  # another gateway process loaded it; this one does not know yet
    assert await AdapterLoads(fake, metrics).ensure(worker, QA) is Outcome.ALREADY
    assert worker.adapters["qa"] == QA.path and loads_of(metrics, "already_loaded") == 1


async def test_a_name_holding_another_folder_is_unloaded_and_loaded_again(worker: Worker) -> None:
    fake = FakeTransport()
    vllm = FakeVllm(fake, worker, {QA.path, "/adapters/old"})
    vllm.held["qa"] = "/adapters/old"  # removed and registered again under the same name
    loads = AdapterLoads(fake)
    with pytest.raises(AdapterLoadFailed) as caught:  # unless told that QA is the name's registration now
        await loads.ensure(worker, QA)
    assert "registered since" in caught.value.reason and vllm.held == {"qa": "/adapters/old"}

    async def current(target: LoraTarget) -> bool:
        return target.path == QA.path

    loads.may_replace = current
    assert await loads.ensure(worker, QA) is Outcome.LOADED
    assert vllm.held == {"qa": QA.path}


async def test_a_failed_load_is_counted_and_says_why(worker: Worker) -> None:
    fake, metrics = FakeTransport(), Metrics(lambda: [])
    FakeVllm(fake, worker, folders=set())
    with pytest.raises(AdapterLoadFailed) as caught:
        await AdapterLoads(fake, metrics).ensure(worker, QA)
    assert "No adapter found for /adapters/qa" in caught.value.reason
    assert "/adapters" not in caught.value.message  # the client's message names no folder
    assert caught.value.retryable and loads_of(metrics, "failed") == 1 and "qa" not in worker.adapters


async def test_a_worker_without_runtime_loading_is_named_as_such(worker: Worker) -> None:
    fake = FakeTransport()
    fake.posts[(worker.url, LOAD_PATH)] = lambda body: (404, {"detail": "Not Found"})
    with pytest.raises(AdapterLoadFailed) as caught:
        await AdapterLoads(fake).ensure(worker, QA)
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True" in caught.value.reason


async def test_forget_and_unload(worker: Worker) -> None:
    fake = FakeTransport()
    vllm = FakeVllm(fake, worker, {QA.path})
    loads = AdapterLoads(fake)
    await loads.ensure(worker, QA)
    vllm.held.clear()  # the worker restarted behind the same address
    loads.forget(worker, "qa")
    assert await loads.ensure(worker, QA) is Outcome.LOADED and vllm.loads == 2
    assert await loads.unload(worker, "qa") and vllm.held == {} and worker.adapters == {}
    assert not await loads.unload(worker, "qa")


async def test_a_workers_listing_is_what_it_holds_and_its_base_entry_stays_its_own(worker: Worker) -> None:
    fake = FakeTransport()
    vllm = FakeVllm(fake, worker, {QA.path})
    vllm.held.update(qa=QA.path, chat="/adapters/chat")
    worker.adapters["gone"] = "/adapters/gone"
    await read_model_entry(fake, worker)
    assert worker.adapters == {"qa": QA.path, "chat": "/adapters/chat"}
    assert worker.max_model_len == 2048 and worker.facts["model_entry"]["id"] == "gemma"


def test_a_move_forgets_the_adapters(worker: Worker) -> None:
    worker.adapters["qa"] = QA.path
    worker.move("http://w0:9999")
    assert worker.adapters == {}


def test_the_engines_running_and_waiting_adapters_are_its_newest_lora_sample() -> None:
    line = 'vllm:lora_requests_info{{max_lora="2",running_lora_adapters="{}",waiting_lora_adapters="{}"}} {}'
    text = "\n".join([
        "# TYPE vllm:lora_requests_info gauge",
        line.format("old", "", 1.7e9), line.format("qa,chat", "sft", 1.8e9), line.format("", "", 1.75e9),
    ])  # fmt: skip
    load = parse_engine_load(text)
    assert load.lora_running == {"qa", "chat"} and load.lora_waiting == {"sft"}
    worker = Worker("gemma", "http://w0")
    worker.adapters["x"] = "/adapters/x"
    worker.observe_engine(load)
    assert [worker.affinity(name) for name in ("qa", "sft", "x", "none")] == [2, 2, 1, 0]
    assert parse_engine_load("").lora_running == frozenset()


async def test_an_adapters_files_are_looked_at_once_a_while_and_compared_by_content(tmp_path: Path) -> None:
    folder = adapter_folder(tmp_path, "qa")
    weights = folder / "adapter_model.safetensors"
    target = LoraTarget("qa", str(folder), "gemma", folder_files(folder))
    watch = FolderWatch(every=3600)
    assert await watch.unchanged(target)
    weights.write_bytes(b"retrained")
    assert await watch.unchanged(target)  # looked at within the hour: not again
    watch.every = 0
    looks = await asyncio.gather(*(watch.unchanged(target) for _ in range(50)))
    assert looks == [False] * 50
    weights.write_bytes(b"")  # the same bytes again (a copy over it): served again
    assert await watch.unchanged(target)
    os.utime(weights, ns=(1, 1))  # touched: the same content (re-review, s27: a touch refused it for good)
    assert await watch.unchanged(target)
    assert await watch.unchanged(LoraTarget("qa", str(folder), "gemma"))  # nothing recorded to compare


async def test_a_registration_again_is_never_judged_by_the_one_before(tmp_path: Path) -> None:
    folder = adapter_folder(tmp_path, "qa")
    old = LoraTarget("qa", str(folder), "gemma", folder_files(folder))
    watch = FolderWatch(every=3600)
    (folder / "adapter_model.safetensors").write_bytes(b"retrained")
    watch.every = 0
    assert not await watch.unchanged(old)
    watch.every = 3600
    again = LoraTarget("qa", str(folder), "gemma", folder_files(folder))  # removed, then added as it is now
    assert await watch.unchanged(again) and not await watch.unchanged(old)


async def test_files_that_cannot_be_looked_at_in_time_count_as_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hung mount: a worker reading them would hang too (re-review, s27)."""
    folder = adapter_folder(tmp_path, "qa")
    target = LoraTarget("qa", str(folder), "gemma", folder_files(folder))
    monkeypatch.setattr(lora_loads, "folder_stats", lambda _: time.sleep(1) or ())
    assert not await FolderWatch(every=0, timeout=0.1).unchanged(target)


async def test_a_hung_look_holds_no_thread_of_the_shared_pool_and_is_not_started_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A look stuck reading (a pipe, a hung mount) took a thread of the shared pool every second until
    every render and registration of the process hung (third review, s27)."""
    folder = adapter_folder(tmp_path, "qa")
    target = LoraTarget("qa", str(folder), "gemma", folder_files(folder))
    release = threading.Event()
    started: list[str] = []

    def stuck(_: Path) -> tuple[()]:
        started.append(threading.current_thread().name)
        release.wait(10)
        return ()

    monkeypatch.setattr(lora_loads, "folder_stats", stuck)
    watch = FolderWatch(every=0, timeout=0.05)
    try:
        for _ in range(5):
            assert not await watch.unchanged(target)
        assert len(started) == 1 and started[0].startswith("adapter-files")  # one look, in its own pool
        assert await asyncio.wait_for(asyncio.to_thread(lambda: "free"), 1) == "free"  # the shared pool is
    finally:
        release.set()


def test_an_adapter_file_that_is_no_regular_file_is_read_without_waiting(tmp_path: Path) -> None:
    folder = adapter_folder(tmp_path, "qa")
    (folder / "adapter_model.safetensors").unlink()
    os.mkfifo(folder / "adapter_model.safetensors")  # nobody writes: an open for reading would wait for ever
    assert folder_files(folder) == UNSERVABLE


async def test_a_registration_read_as_unservable_is_never_unchanged_and_a_new_one_is_looked_at_afresh(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """UNSERVABLE compared equal to itself, so a pipe as the weights counted as unchanged; a hung look of an
    old registration held a new one's verdict (last review, s27)."""
    folder = adapter_folder(tmp_path, "qa")
    assert not await FolderWatch().unchanged(LoraTarget("qa", str(folder), "gemma", UNSERVABLE))
    old = LoraTarget("qa", str(folder / "old"), "gemma", (("adapter_config.json", 1, "x"),))
    release = threading.Event()
    real = lora_loads.folder_stats
    monkeypatch.setattr(
        lora_loads, "folder_stats", lambda f: release.wait(10) and () if "old" in str(f) else real(f)
    )
    watch = FolderWatch(every=0, timeout=0.05)
    try:
        assert not await watch.unchanged(old)
        again = LoraTarget("qa", str(folder), "gemma", folder_files(folder))
        assert await watch.unchanged(again)
    finally:
        release.set()

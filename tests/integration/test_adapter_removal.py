"""Removing and registering adapters while they are used, in the real app before the stand-in worker: a
removal waits for the requests the worker reports (those of other processes and pods too), takes the
adapter's metrics series with it, never waits behind another name's slow registration, and a
registration that loses its name to another process's leaves the winner's adapter loaded; /ready, open to
all, names no adapter while keys guard the gateway."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from service.api.handlers.adapters import registry_of
from service.errors import AdapterLoadFailed
from tests.adapters import adapter_folder
from tests.integration.conftest import running_gateway
from tests.integration.standin import Script
from tests.integration.test_adapters import ADMIN, lora_settings
from tests.promtext import Samples, parse


@pytest.fixture(autouse=True)
def vllm_names(script: Script) -> None:
    script.served = {"base", "chat", "plain"}


def labelled(samples: Samples, name: str) -> set[str]:
    """The names of the series with a label whose value is `name`."""
    return {metric for metric, labels in samples if name in dict(labels).values()}


async def unloaded(script: Script, name: str, seconds: float) -> bool:
    """Whether the worker was asked to unload `name` within `seconds`."""
    for _ in range(int(seconds / 0.05)):
        if name in script.unloads:
            return True
        await asyncio.sleep(0.05)
    return name in script.unloads


async def test_a_removal_waits_for_what_the_worker_runs_and_takes_the_adapters_series_with_it(
    standin_url: str, script: Script, tmp_path: Path
) -> None:
    folder = adapter_folder(tmp_path, "shared")
    async with running_gateway(lora_settings(standin_url, tmp_path)) as (_, http):
        body = {"model": "base", "name": "shared", "path": str(folder)}
        assert (await http.post("/adapters", json=body, headers=ADMIN)).status_code == 200
        for model in ("shared", "base"):
            assert (await http.post("/complete", json={"model": model, "prompt": "Hi"})).status_code == 200
        before = labelled(parse((await http.get("/metrics", headers=ADMIN)).text), "shared")
        assert before >= {"gateway_requests_total", "gateway_adapter_loads_total"}
        # Another gateway process (or pod) streams with it: this one's count is zero, the worker's is not.
        script.lora_running = {"shared"}
        assert (await http.delete("/adapters/shared", headers=ADMIN)).status_code == 200
        assert (await http.post("/complete", json={"model": "shared", "prompt": "Hi"})).status_code == 404
        assert not await unloaded(script, "shared", 4.0)  # two polls (2 s) and then some: still in use
        script.lora_running = set()  # that stream ended
        assert await unloaded(script, "shared", 3.0)
        assert "shared" not in script.adapters
        left = parse((await http.get("/metrics", headers=ADMIN)).text)
        assert labelled(left, "shared") == set()
        assert "gateway_requests_total" in labelled(left, "base")  # the other models' series stay


async def test_a_removal_does_not_wait_behind_a_slow_registration_of_another_name(
    standin_url: str, script: Script, tmp_path: Path
) -> None:
    async with running_gateway(lora_settings(standin_url, tmp_path)) as (_, http):
        quick = {"model": "base", "name": "quick", "path": str(adapter_folder(tmp_path, "quick"))}
        assert (await http.post("/adapters", json=quick, headers=ADMIN)).status_code == 200
        script.load_delay = 3.0
        slow = {"model": "base", "name": "slow", "path": str(adapter_folder(tmp_path, "slow"))}
        registering = asyncio.ensure_future(http.post("/adapters", json=slow, headers=ADMIN))
        while "slow" not in script.loads:  # noqa: ASYNC110 (the stand-in's record)
            await asyncio.sleep(0.01)
        same = await http.post("/adapters", json=slow, headers=ADMIN)  # the name is taken meanwhile
        assert same.status_code == 400 and "being registered" in same.json()["error"]["message"]
        removed = await http.delete("/adapters/quick", headers=ADMIN)
        assert removed.status_code == 200 and not registering.done()
        assert (await registering).status_code == 200


async def test_a_registration_that_loses_its_name_leaves_the_winners_adapter_loaded(
    standin_url: str, script: Script, tmp_path: Path
) -> None:
    folder = adapter_folder(tmp_path, "twice")
    settings = lora_settings(standin_url, tmp_path)
    # Two gateway processes on one store, the same registration sent to both at once.
    async with running_gateway(settings) as (_, first), running_gateway(settings) as (_, second):
        script.load_delay = 0.5
        body = {"model": "base", "name": "twice", "path": str(folder)}
        answers = await asyncio.gather(
            *(http.post("/adapters", json=body, headers=ADMIN) for http in (first, second))
        )
        assert sorted(answer.status_code for answer in answers) == [200, 400], [a.text for a in answers]
        assert script.unloads == [] and script.adapters == {"twice": str(folder.resolve())}


async def test_ready_names_no_adapter_while_keys_guard_the_gateway(
    standin_url: str, script: Script, tmp_path: Path
) -> None:
    qa = adapter_folder(tmp_path, "qa")
    settings = lora_settings(standin_url, tmp_path, [{"name": "qa", "path": str(qa)}], api_keys="client-1")
    async with running_gateway(settings) as (_, http):
        client = {"Authorization": "Bearer client-1"}
        answer = await http.post("/complete", json={"model": "qa", "prompt": "Hi"}, headers=client)
        assert answer.status_code == 200, answer.text
        ready = (await http.get("/ready")).json()
        assert ready["status"] == "ready" and "adapters" not in ready and "qa" not in str(ready)


async def test_a_request_admitted_before_a_removal_never_puts_the_old_folder_back_under_a_new_registration(
    standin_url: str, script: Script, tmp_path: Path
) -> None:
    old, new = adapter_folder(tmp_path, "old"), adapter_folder(tmp_path, "new")
    async with running_gateway(lora_settings(standin_url, tmp_path)) as (app, http):
        assert (await http.post("/adapters", json={"model": "base", "name": "v", "path": str(old)},
                                headers=ADMIN)).status_code == 200  # fmt: skip
        stale = app.state.gateway.models["v"].adapter.target  # what a request queued now carries
        assert (await http.delete("/adapters/v", headers=ADMIN)).status_code == 200
        body = {"model": "base", "name": "v", "path": str(new)}
        again = await http.post("/adapters", json=body, headers=ADMIN)
        assert again.status_code == 200, again.text
        assert script.adapters["v"] == str(new.resolve())  # the new registration replaced the old folder
        [worker] = app.state.gateway.pools["base"].workers
        worker.adapters.pop("v")  # as a process that has not looked at this worker since
        with pytest.raises(AdapterLoadFailed) as refused:
            await app.state.gateway.loads.ensure(worker, stale)
        assert "registered since" in refused.value.reason
        assert script.adapters["v"] == str(new.resolve())  # the old folder is not put back
        answer = await http.post("/complete", json={"model": "v", "prompt": "Hi"})
        assert answer.status_code == 200 and script.adapters["v"] == str(new.resolve())


async def test_a_removal_never_unloads_the_name_another_process_registered_again(
    standin_url: str, script: Script, tmp_path: Path
) -> None:
    old, new = adapter_folder(tmp_path, "old"), adapter_folder(tmp_path, "new")
    settings = lora_settings(standin_url, tmp_path)
    async with running_gateway(settings) as (app, first), running_gateway(settings) as (_, second):
        body = {"model": "base", "name": "v", "path": str(old)}
        assert (await first.post("/adapters", json=body, headers=ADMIN)).status_code == 200
        follower = registry_of(app.state.gateway)._follower
        assert follower is not None
        follower.cancel()  # it has not read the store since (the gap of a poll)
        assert (await first.delete("/adapters/v", headers=ADMIN)).status_code == 200
        # The other process registers the name again before the first one's unload (two polls later).
        again = await second.post("/adapters", json={**body, "path": str(new)}, headers=ADMIN)
        assert again.status_code == 200, again.text
        await asyncio.sleep(3.5)  # the first process's removal has run its course
        assert script.adapters.get("v") == str(new.resolve()), script.unloads


async def test_a_removal_from_a_process_that_has_not_seen_the_last_change_removes_nothing_newer(
    standin_url: str, script: Script, tmp_path: Path
) -> None:
    """A client's DELETE retried on another process (review of issue 20, s27): it answered 200 for an
    adapter already removed, and would have removed a registration made since under the same name."""
    old, new = adapter_folder(tmp_path, "old"), adapter_folder(tmp_path, "new")
    settings = lora_settings(standin_url, tmp_path)
    async with running_gateway(settings) as (_, first), running_gateway(settings) as (app, second):
        for name in ("v", "w"):
            body = {"model": "base", "name": name, "path": str(old)}
            assert (await first.post("/adapters", json=body, headers=ADMIN)).status_code == 200
        registry = registry_of(app.state.gateway)
        for _ in range(100):  # the second process serves them, then stops following the store
            if {"v", "w"} <= set(app.state.gateway.models):
                break
            await asyncio.sleep(0.05)
        assert registry._follower is not None
        registry._follower.cancel()
        assert (await first.delete("/adapters/w", headers=ADMIN)).status_code == 200
        gone = await second.delete("/adapters/w", headers=ADMIN)
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "adapter_not_found", gone.text
        assert (await first.delete("/adapters/v", headers=ADMIN)).status_code == 200
        again = {"model": "base", "name": "v", "path": str(new)}
        assert (await first.post("/adapters", json=again, headers=ADMIN)).status_code == 200
        stale = await second.delete("/adapters/v", headers=ADMIN)  # decided on the old registration
        assert stale.status_code == 400 and "registered again meanwhile" in stale.text, stale.text
        listed = (await first.get("/adapters", headers=ADMIN)).json()["data"]
        assert [(a["name"], a["path"]) for a in listed] == [("v", str(new))]
        assert (await second.delete("/adapters/v", headers=ADMIN)).status_code == 200  # now it knows
        assert (await second.delete("/adapters/v", headers=ADMIN)).status_code == 404


async def test_a_process_that_has_not_read_the_last_change_catches_up_before_answering(
    standin_url: str, script: Script, tmp_path: Path
) -> None:
    """A DELETE right after a registration made in another process said 404 and left the adapter served;
    an add right after a removal there said "already served" (re-review, s27)."""
    folder = adapter_folder(tmp_path, "r1")
    settings = lora_settings(standin_url, tmp_path)
    async with running_gateway(settings) as (_, first), running_gateway(settings) as (app, second):
        registry = registry_of(app.state.gateway)
        assert registry._follower is not None
        registry._follower.cancel()  # the second process reads the store only when it must
        body = {"model": "base", "name": "r1", "path": str(folder)}
        assert (await first.post("/adapters", json=body, headers=ADMIN)).status_code == 200
        removed = await second.delete("/adapters/r1", headers=ADMIN)
        assert removed.status_code == 200, removed.text
        assert (await first.post("/adapters", json=body, headers=ADMIN)).status_code == 200
        assert "r1" not in app.state.gateway.models  # not read yet
        await registry.refresh()  # read; then removed by the first process, which it has not read
        assert (await first.delete("/adapters/r1", headers=ADMIN)).status_code == 200
        added = await second.post("/adapters", json=body, headers=ADMIN)
        assert added.status_code == 200, added.text

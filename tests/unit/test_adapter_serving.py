"""An adapter as a served model: resolved once (its own name and kind, its model's pool), loaded on the
chosen replica before its request goes there, loaded again and the request sent once more when the
worker says it does not know it; and the store that keeps runtime registrations."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.core.adapter_checks import served_adapter
from service.core.gateway import Gateway
from service.core.served import RUNTIME, Adapter, ServedModel, ServedModels
from service.errors import ModelNotFound, NotAChatModel, UpstreamRejected
from service.ops.metrics import Metrics
from service.ops.record import RequestRecord
from service.ops.settings import ModelKind, ModelSpec, Settings
from service.store import adapters as store
from service.store.database import Database, default_url
from service.workers.fake import FakeStream, FakeTransport
from service.workers.pool import Capacity, ModelPool, Worker
from service.workers.routing import RouteHint
from tests.helpers import call_asgi, outstanding
from tests.unit.test_gateway import ANSWER, DONE, token
from tests.unit.test_lora_loads import FakeVllm

QA = Adapter("qa", "/adapters/qa", "m", RUNTIME, 8)
NOT_FOUND = {"error": {"message": "The model `qa` does not exist. Valid aliases: m.", "type": "NotFound"}}


def setup(*workers: Worker) -> tuple[Gateway, FakeTransport, ServedModel, ServedModel]:
    spec = ModelSpec(name="m", kind=ModelKind.BASE, urls=["http://unused"], tokenizer="unused", lora=True)
    pool = ModelPool(spec, list(workers), Capacity(per_worker=4, queue=4, queue_timeout=1))
    fake = FakeTransport()
    gateway = Gateway(Settings(models=[spec]), {"m": pool}, {}, fake, Metrics(lambda: []), set())
    model = ServedModel("m", ModelKind.BASE, None, pool)  # type: ignore[arg-type]  # no tokenizer needed
    adapter = ServedModel("qa", ModelKind.BASE, None, pool, QA)  # type: ignore[arg-type]
    gateway.models = ServedModels([model, adapter])
    return gateway, fake, model, adapter


def record_of(gateway: Gateway) -> RequestRecord:
    return RequestRecord(gateway.metrics, "id", "v1_completions", model="qa")


def up(name: str) -> Worker:
    return Worker("m", f"http://{name}", name=name, up=True)


def test_an_adapter_resolves_to_its_own_name_and_kind_on_its_models_pool() -> None:
    gateway, _, model, adapter = setup(up("a"))
    found = gateway.resolve("qa", ModelKind.INSTRUCT)
    assert found is adapter and found.pool is model.pool and found.parent == "m" and model.parent is None
    assert gateway.resolve(None, ModelKind.BASE) is model  # the default of a kind is a model, not an adapter
    with pytest.raises(NotAChatModel):
        found.require_chat()
    gateway.models.remove("qa")
    with pytest.raises(ModelNotFound):
        gateway.resolve("qa", ModelKind.BASE)


async def test_an_adapter_is_loaded_on_the_chosen_replica_before_its_request() -> None:
    a = up("a")
    gateway, fake, _, adapter = setup(a)
    vllm = FakeVllm(fake, a, {QA.path})
    fake.reply(a, ANSWER)
    assert (await gateway.generate(adapter, {"model": "qa"}, record_of(gateway))).data == ANSWER
    assert [path for _, path, _ in fake.sent] == ["/v1/load_lora_adapter", "/v1/completions"]
    await gateway.generate(adapter, {"model": "qa"}, record_of(gateway))
    assert vllm.loads == 1 and adapter.usage.requests == 0 and outstanding(gateway) == 0


async def test_a_worker_that_forgot_the_adapter_gets_it_again_and_the_request_once_more() -> None:
    a = up("a")
    gateway, fake, _, adapter = setup(a)
    vllm = FakeVllm(fake, a, {QA.path})
    a.adapters["qa"] = QA.path  # held, as far as the gateway knew; the worker restarted meanwhile
    fake.reply(a, UpstreamRejected(404, NOT_FOUND), ANSWER)
    assert (await gateway.generate(adapter, {"model": "qa"}, record_of(gateway))).data == ANSWER
    paths = [path for _, path, _ in fake.sent]
    assert paths == ["/v1/completions", "/v1/load_lora_adapter", "/v1/completions"]
    assert vllm.loads == 1 and vllm.held == {"qa": QA.path}


async def test_a_stream_is_reopened_after_the_adapter_is_loaded_again() -> None:
    a = up("a")
    gateway, fake, _, adapter = setup(a)
    FakeVllm(fake, a, {QA.path})
    a.adapters["qa"] = QA.path
    fake.reply(a, UpstreamRejected(404, NOT_FOUND), FakeStream([token("hi"), DONE]))
    response = await gateway.stream(adapter, {"model": "qa", "stream": True}, record_of(gateway), None)
    call = await call_asgi(response, "POST", "/v1/completions")
    assert b"hi" in call.body and adapter.usage.requests == 0 and outstanding(gateway) == 0


async def test_other_refusals_and_a_second_404_reach_the_client() -> None:
    a = up("a")
    gateway, fake, _, adapter = setup(a)
    vllm = FakeVllm(fake, a, {QA.path})
    fake.reply(a, UpstreamRejected(400, {"error": {"message": "n must be 1"}}))
    with pytest.raises(UpstreamRejected, match="n must be 1"):
        await gateway.generate(adapter, {"model": "qa"}, record_of(gateway))
    assert vllm.loads == 1
    fake.replies.clear()
    fake.reply(a, UpstreamRejected(404, NOT_FOUND))  # every time: loading it again does not help
    with pytest.raises(UpstreamRejected):
        await gateway.generate(adapter, {"model": "qa"}, record_of(gateway))
    assert vllm.loads == 2 and adapter.usage.requests == 0 and outstanding(gateway) == 0


async def test_a_plain_request_never_asks_about_adapters() -> None:
    a = up("a")
    gateway, fake, model, _ = setup(a)
    fake.reply(a, UpstreamRejected(404, NOT_FOUND))
    with pytest.raises(UpstreamRejected):
        await gateway.generate(model, {"model": "m"}, record_of(gateway))
    assert [path for _, path, _ in fake.sent] == ["/v1/completions"]


def test_route_hints_carry_the_adapter_under_every_policy() -> None:
    from service.core.context import RequestContext

    gateway, _, model, adapter = setup(up("a"), up("b"))
    ctx = RequestContext("id", record_of(gateway))
    assert gateway.route_hint(adapter, ctx, [1, 2, 3]) == RouteHint(tokens=[1, 2, 3], adapter="qa")
    assert gateway.route_hint(model, ctx, [1, 2, 3]) == RouteHint(tokens=[1, 2, 3])


def test_an_adapters_own_template_renders_its_chats_and_one_like_its_models_does_not(
    tmp_path: Path,
) -> None:
    from service.core.templates import load_tokenizer
    from tests.adapters import CHATML

    settings = Settings()
    spec = next(m for m in settings.models if m.kind is ModelKind.INSTRUCT)
    tokenizer = load_tokenizer(spec, settings)
    parent = ServedModel(spec.name, ModelKind.INSTRUCT, tokenizer, ModelPool(spec))
    own = served_adapter(parent, Adapter("own", "/a", spec.name, RUNTIME, 8, "", CHATML), ModelKind.INSTRUCT)
    assert own.worker_chat_template == CHATML and own.tokenizer is not tokenizer
    rendered = own.tokenizer.render_chat([{"role": "user", "content": "Hi"}])
    assert rendered.text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.render_chat([{"role": "user", "content": "Hi"}]).text != rendered.text
    same = Adapter("same", "/a", spec.name, RUNTIME, 8, "", tokenizer.chat_template)
    assert served_adapter(parent, same, ModelKind.INSTRUCT).worker_chat_template is None
    base = served_adapter(parent, Adapter("b", "/a", spec.name, RUNTIME, 8, "", CHATML), ModelKind.BASE)
    assert base.worker_chat_template is None and base.tokenizer is tokenizer


def test_the_store_keeps_registrations_and_bumps_their_revision(tmp_path: Path) -> None:
    database = Database(default_url(tmp_path))
    try:
        store_steps(database)
    finally:
        database.close()


def store_steps(database: Database) -> None:
    """Registrations kept, refused twice, removed; each write one more revision (SQLite and PostgreSQL)."""
    database.migrate()
    assert store.snapshot(database, None) == (0, [])
    row = store.AdapterRow("qa", "m", "/adapters/qa", "base", None, "QA")
    stored = store.add(database, row)
    assert stored.created_at is not None
    revision, rows = store.snapshot(database, 0)
    assert revision == 1 and [(r.name, r.description) for r in rows or []] == [("qa", "QA")]
    assert rows == [stored]  # read back as added, its time zone included (the registry compares them)
    assert store.snapshot(database, 1) == (1, None)  # nothing read while the revision stands
    with pytest.raises(store.AdapterExists):
        store.add(database, row)
    assert store.snapshot(database, None)[0] == 1  # a refused write bumps nothing
    assert store.remove(database, "qa") and not store.remove(database, "qa")
    assert store.snapshot(database, 1) == (2, [])


def test_an_instruct_adapter_of_a_base_model_stops_at_its_templates_end_of_turn() -> None:
    # The base Gemma's EOS is <eos>; an adapter taught Gemma's turns ends them with <end_of_turn>, where the
    # worker would not stop on its own.
    from service.core.templates import load_tokenizer
    from tests.adapters import CHATML, GEMMA_TURNS

    settings = Settings()
    specs = {m.kind: m for m in settings.models}
    gemma = load_tokenizer(specs[ModelKind.BASE], settings)
    parent = ServedModel("g", ModelKind.BASE, gemma, ModelPool(specs[ModelKind.BASE]))
    chat = served_adapter(parent, Adapter("c", "/a", "g", RUNTIME, 8, "", GEMMA_TURNS), ModelKind.INSTRUCT)
    end_of_turn = gemma.token_strings(list(chat.chat_stop_token_ids))
    assert end_of_turn == ["<end_of_turn>"] and chat.tokenizer.end_of_turn_id() != gemma.eos_id
    smol = load_tokenizer(specs[ModelKind.INSTRUCT], settings)
    assert smol.end_of_turn_id() == smol.eos_id  # ChatML ends turns with SmolLM2's own EOS
    smol_parent = ServedModel("s", ModelKind.BASE, smol, ModelPool(specs[ModelKind.INSTRUCT]))
    same = served_adapter(smol_parent, Adapter("c", "/a", "s", RUNTIME, 8, "", CHATML), ModelKind.INSTRUCT)
    assert same.worker_chat_template == CHATML and same.chat_stop_token_ids == ()
    assert parent.chat_stop_token_ids == ()

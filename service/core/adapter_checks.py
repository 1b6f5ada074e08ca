"""What an adapter becomes before it is served: a registration request checked against its folder and
its model (each refusal a 400 naming the field, in words an operator can act on), and the served model
it is: its own name and kind, its model's pool, and its model's tokenizer (with its own chat template
when it brings one for chat)."""

from __future__ import annotations

import dataclasses
from datetime import datetime
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from service.core.served import CONFIG, RUNTIME, Adapter, ServedModel
from service.errors import GatewayError, InvalidRequest
from service.ops.lora import (
    UNSERVABLE,
    AdapterFolderError,
    FolderFiles,
    folder_files,
    read_lora,
    read_template,
    same_base,
)
from service.ops.settings import ModelKind, ServedName, Settings
from service.store.adapters import AdapterRow


class AdapterRequest(BaseModel):
    """POST /adapters: a LoRA adapter to serve on a model's workers, under its own name."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=128, description="The served model it was trained from.")
    name: ServedName = Field(min_length=1, max_length=128, description="Its served name.")
    path: str = Field(
        min_length=1, max_length=4096,
        description="Its folder (adapter_config.json and weights), an absolute path the gateway and the "
        "model's workers both see.",
    )  # fmt: skip
    kind: ModelKind | None = Field(default=None, description="`base` or `instruct`; unset: the model's.")
    chat_template: str | None = Field(
        default=None, min_length=1, max_length=4096,
        description="A Jinja file in the adapter's folder (absolute path) for an instruct adapter; "
        "unset: the folder's chat_template.jinja, else its tokenizer_config.json template, else the "
        "model's own.",
    )  # fmt: skip
    description: str = Field(default="", max_length=1000, description="What it was trained for.")


def configured(settings: Settings, models: dict[str, ServedModel]) -> list[ServedModel]:
    """The adapters of the models file, as served models (files read: call off the event loop)."""
    found = []
    for spec in settings.models:
        parent = models[spec.name]
        for item in spec.adapters:
            kind = spec.kind_of(item)
            template = read_template(item.path, item.chat_template) if kind is ModelKind.INSTRUCT else None
            adapter = Adapter(item.name, str(item.path), spec.name, CONFIG, item.rank, item.description,
                              template, files=folder_files(item.path))  # fmt: skip
            found.append(served_adapter(parent, adapter, kind))
    return found


def from_row(row: AdapterRow, parent: ServedModel, files: FolderFiles | None = None) -> ServedModel:
    """A registered adapter as stored, as a served model (its folder read again for its rank, and for
    its files unless given as checked: call off the event loop). One whose folder is gone, or now holds
    a rank over its workers' maximum, is served as unservable: its requests are refused (503
    adapter_changed), never sent to a worker that would fail reading it."""
    folder = Path(row.path)
    try:
        rank = read_lora(folder).rank
    except AdapterFolderError:
        rank = 0
    if files is None:
        files = folder_files(folder)
    if not rank or rank > parent.spec.lora_max_rank or not files:
        files = UNSERVABLE
    adapter = Adapter(row.name, row.path, row.model, RUNTIME, rank, row.description, row.chat_template,
                      row.created_at, files=files)  # fmt: skip
    kind = ModelKind(row.kind)
    return served_adapter(parent, adapter, kind)


def served_adapter(parent: ServedModel, adapter: Adapter, kind: ModelKind) -> ServedModel:
    """`adapter` on `parent`'s workers: a template of its own (for chat, and other than the model's)
    gets a tokenizer that renders with it, and is what the workers are sent; else the model's own."""
    tokenizer = parent.tokenizer
    template = adapter.chat_template if kind is ModelKind.INSTRUCT else None
    if template is not None and template == tokenizer.chat_template:
        template = None  # the same as the model's: the workers render it already
    stops: tuple[int, ...] = ()
    if template is not None:
        tokenizer = tokenizer.with_chat_template(template, adapter.name)
        end = tokenizer.end_of_turn_id()
        stops = (end,) if end is not None and end != tokenizer.eos_id else ()
    own = dataclasses.replace(adapter, chat_template=template, chat_stop_token_ids=stops)
    return ServedModel(adapter.name, kind, tokenizer, parent.pool, own)


def checked(request: AdapterRequest, parent: ServedModel, settings: Settings) -> tuple[Adapter, ModelKind]:
    """The adapter a registration asks for, checked against its folder and its model (files read: call
    off the event loop); InvalidRequest naming the field otherwise."""
    spec = parent.spec
    folder = Path(request.path)
    files = folder_files(folder)
    try:
        facts = read_lora(folder)
    except AdapterFolderError as exc:
        raise InvalidRequest(f"path: {exc}.", param="path") from None
    if files == UNSERVABLE:
        raise InvalidRequest(
            f"path: {folder} holds an adapter file that is no regular file (a pipe or a device): a worker "
            "would wait for ever reading it.",
            param="path",
        )
    if facts.rank > spec.lora_max_rank:
        raise InvalidRequest(
            f"path: the adapter's rank is {facts.rank}, over the {spec.lora_max_rank} the workers of "
            f"'{spec.name}' take (its max_lora_rank).",
            param="path",
        )
    sources = weights_of(parent, settings)
    if same_base(facts.base_model, sources) is False:
        raise InvalidRequest(
            f"path: the adapter was trained from {facts.base_model}, not from '{spec.name}' "
            f"({' or '.join(dict.fromkeys(sources))}).",
            param="path",
        )
    kind = request.kind or parent.kind
    template = _template(request, folder) if kind is ModelKind.INSTRUCT else None
    if kind is ModelKind.INSTRUCT and parent.kind is ModelKind.BASE and not template:
        raise InvalidRequest(
            f"chat_template: an instruct adapter on the base model '{spec.name}' needs a chat template: send "
            "`chat_template` (a Jinja file), or put chat_template.jinja in the adapter's folder.",
            param="chat_template",
        )
    if template:
        _renders(parent, template, request.name)
    description = request.description
    adapter = Adapter(request.name, str(folder), spec.name, RUNTIME, facts.rank, description, template,
                      files=files)  # fmt: skip
    return adapter, kind


def weights_of(parent: ServedModel, settings: Settings) -> list[str]:
    """Where a model's weights come from: its configured source, and what its workers say they loaded."""
    spec = parent.spec
    sources = [settings.resolve_source(spec.source)] if spec.source else []
    root = (parent.pool.fact("model_entry") or {}).get("root")
    if isinstance(root, str) and root:
        sources.append(root)
    return sources


def model_for(path: str, models: list[ServedModel], settings: Settings) -> ServedModel:
    """The model an adapter folder is for, when the request does not say (vLLM's load API names none):
    the one model that takes adapters, else the one it was trained from (files read: call off the event
    loop); InvalidRequest otherwise."""
    if len(models) == 1:
        return models[0]
    try:
        base = read_lora(Path(path)).base_model
    except AdapterFolderError as exc:
        raise InvalidRequest(f"lora_path: {exc}.", param="lora_path") from None
    fits = [m for m in models if same_base(base, weights_of(m, settings))]
    if len(fits) == 1:
        return fits[0]
    names = ", ".join(m.name for m in models) or "none"
    raise InvalidRequest(
        f"lora_path: cannot tell which model the adapter is for (models that take adapters: {names}); "
        "register it with POST /adapters, which names its `model`.",
        param="lora_path",
    )


def _renders(parent: ServedModel, template: str, name: str) -> None:
    """A chat template that cannot render a one-message chat would fail every chat: refused now."""
    try:
        parent.tokenizer.with_chat_template(template, name).render_chat(
            [{"role": "user", "content": "Hello."}]
        )
    except GatewayError as exc:
        raise InvalidRequest(
            f"chat_template: the template cannot render a one-message chat ({exc.message})",
            param="chat_template",
        ) from None


def _template(request: AdapterRequest, folder: Path) -> str | None:
    explicit = Path(request.chat_template) if request.chat_template is not None else None
    if explicit is not None and not (explicit.is_absolute() and explicit.is_file()):
        raise InvalidRequest(
            f"chat_template: {explicit} is not a file the gateway can see (give an absolute path).",
            param="chat_template",
        )
    try:
        return read_template(folder, explicit)
    except (AdapterFolderError, OSError) as exc:
        raise InvalidRequest(f"chat_template: {exc}.", param="chat_template") from None


def row_of(adapter: Adapter, kind: ModelKind, created_at: datetime | None = None) -> AdapterRow:
    """What the store keeps of a registration."""
    return AdapterRow(adapter.name, adapter.model, adapter.path, kind.value, adapter.chat_template,
                      adapter.description, created_at)  # fmt: skip

"""What a request names: a served model, resolved once into everything downstream needs.

A served model is a name a client may send as `model`, its kind (base or instruct), the tokenizer and
chat template its prompts are made with, the pool of replicas that runs it, and the LoRA adapter those
replicas apply for it, if any. Every step after resolution (caps, rendering, context and scoring checks,
admission, the body sent to a worker, metrics) takes the served model, so a variant that shares another
model's workers (a fine-tuned adapter) is one more entry in the table, not a branch anywhere downstream;
the one step that asks for the adapter is the one that makes sure the chosen replica holds it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime

from service.core.templates import ModelTokenizer
from service.errors import ModelNotFound, NotAChatModel
from service.ops.lora import FolderFiles
from service.ops.settings import ModelKind, ModelSpec
from service.workers.lora import LoraTarget
from service.workers.pool import ModelPool

CONFIG = "config"  # an adapter from the models file
RUNTIME = "runtime"  # an adapter registered through the operator API (kept in the store)


@dataclass(frozen=True)
class Adapter:
    """What makes a served model a fine-tuned variant of another: a LoRA adapter its workers apply."""

    name: str
    path: str  # its folder, as the workers see it
    model: str  # the served name of the model it was trained for (its parent)
    source: str  # CONFIG or RUNTIME
    rank: int
    description: str = ""
    # A chat template of its own, which the worker is sent with each chat request (vLLM renders an
    # adapter's chats with its base model's template); None: the model's own.
    chat_template: str | None = None
    created_at: datetime | None = None
    # Where its own template ends a turn, when its workers would not stop there (a base model's EOS is
    # not the end-of-turn token an instruct adapter learnt): sent as `stop_token_ids` with its chats.
    chat_stop_token_ids: tuple[int, ...] = ()
    files: FolderFiles = ()  # its files as they were when checked (a worker must read no others)

    @property
    def target(self) -> LoraTarget:
        """What to load onto a worker."""
        return LoraTarget(self.name, self.path, self.model, self.files)


@dataclass
class Usage:
    """Requests of this process that hold or wait for a worker of a served model now."""

    requests: int = 0


@dataclass(frozen=True, eq=False)
class ServedModel:
    """One name a client may send as `model`."""

    name: str  # what the client sends and the worker is asked for
    kind: ModelKind
    tokenizer: ModelTokenizer
    pool: ModelPool  # the replicas that run it (and hold its slots)
    adapter: Adapter | None = None  # the LoRA adapter its workers apply; None for a model itself
    usage: Usage = field(default_factory=Usage)

    @property
    def parent(self) -> str | None:
        """The served name of the model an adapter is for; None for a model itself."""
        return self.adapter.model if self.adapter is not None else None

    @property
    def chat_stop_token_ids(self) -> tuple[int, ...]:
        """Token ids its chats must stop at besides the worker's own (its template's end of turn)."""
        return self.adapter.chat_stop_token_ids if self.adapter is not None else ()

    @property
    def worker_chat_template(self) -> str | None:
        """A chat template the worker must be sent to render this model's chats (it knows only its
        base model's); None when the worker's own is the one."""
        return self.adapter.chat_template if self.adapter is not None else None

    @property
    def spec(self) -> ModelSpec:
        """The configuration of the model whose workers run it."""
        return self.pool.spec

    @property
    def max_model_len(self) -> int | None:
        """Its context length (that of the workers that run it)."""
        return self.pool.max_model_len

    def require_chat(self) -> None:
        """Chat needs an instruct model; a base model is refused with a pointer to /complete."""
        if self.kind is not ModelKind.INSTRUCT:
            raise NotAChatModel(self.name)


class ServedModels(Mapping[str, ServedModel]):
    """Every served model by name, in the order they were added (the first of a kind is the default)."""

    def __init__(self, models: list[ServedModel] | None = None) -> None:
        self._models: dict[str, ServedModel] = {}
        for model in models or []:
            self.add(model)

    def add(self, model: ServedModel) -> None:
        self._models[model.name] = model

    def remove(self, name: str) -> None:
        self._models.pop(name, None)

    def __getitem__(self, name: str) -> ServedModel:
        return self._models[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._models)

    def __len__(self) -> int:
        return len(self._models)

    def resolve(self, name: str | None, default_kind: ModelKind) -> ServedModel:
        """The named model, or the first one of `default_kind`; a 404 listing the served names."""
        if name is None:
            found = next((m for m in self._models.values() if m.kind is default_kind), None)
            if found is None:
                raise ModelNotFound(f"<default {default_kind.value} model>", list(self._models))
            return found
        model = self._models.get(name)
        if model is None:
            raise ModelNotFound(name, list(self._models))
        return model


def models_of(pools: Mapping[str, ModelPool], tokenizers: Mapping[str, ModelTokenizer]) -> ServedModels:
    """The configured models, one per pool (with its tokenizer: every configured model has one)."""
    return ServedModels(
        [
            ServedModel(name, pool.kind, tokenizers[name], pool)
            for name, pool in pools.items()
            if name in tokenizers
        ]
    )

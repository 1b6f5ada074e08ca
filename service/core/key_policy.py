"""What an API key managed at runtime may do: the models or kinds it may use, its request rate, how many
requests it may have in progress at once, and its token budget per period.

A model is allowed when it is among `models` (served names, adapters included) if that is set, and of one
of `kinds` if that is set: both rules hold when both are given. A refusal is a 403 naming the rule.
"""

from __future__ import annotations

import calendar
import functools
import math
import re
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator

from service.core.protocol import FAIL_FAST
from service.core.served import ServedModel
from service.errors import Forbidden
from service.ops.settings import ModelKind

MODEL_NAME = re.compile(r"^[A-Za-z0-9._:/-]{1,128}$")  # a served name, as the models file allows it
MAX_MODELS = 256
RATE_BUCKETS = 60  # a rate's window moves in steps of 1/60 of its length, as GATEWAY_RATE_LIMIT's does
MAX_RATE_REQUESTS = 10**12
ZERO_PERIOD = re.compile(r"(/|\bper)\s*0+\s*[A-Za-z]", re.IGNORECASE)  # `1/0second`, `1 per 0 seconds`


class Period(StrEnum):
    """How often a token budget starts again (at 00:00 UTC), or never."""

    DAY = "day"
    MONTH = "month"
    NONE = "none"


class TokenBudget(BaseModel):
    """At most `tokens` (prompt and generated together) per period."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tokens: int = Field(ge=1, le=10**15, description="Tokens, prompt and generated together, per period.")
    period: Period = Field(default=Period.DAY, description="`day`, `month` (both from 00:00 UTC) or `none`.")

    def bucket(self, now: float) -> int:
        """The period `now` (seconds since the epoch) falls in, as a number that only grows."""
        if self.period is Period.DAY:
            return int(now // 86_400)
        if self.period is Period.MONTH:
            moment = datetime.fromtimestamp(now, UTC)
            return moment.year * 12 + moment.month - 1
        return 0

    def resets_at(self, now: float) -> datetime | None:
        """When the period `now` is in ends (None: a budget that never starts again)."""
        moment = datetime.fromtimestamp(now, UTC)
        start = moment.replace(hour=0, minute=0, second=0, microsecond=0)
        if self.period is Period.DAY:
            return start + timedelta(days=1)
        if self.period is Period.MONTH:
            days = calendar.monthrange(moment.year, moment.month)[1]
            return start.replace(day=1) + timedelta(days=days)
        return None


class KeyPolicy(BaseModel):
    """The rules of one key; every field unset means no rule of that kind (global settings apply)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    models: Annotated[list[str], FAIL_FAST] | None = Field(
        default=None, min_length=1, max_length=MAX_MODELS, description="Served names it may use."
    )
    kinds: Annotated[list[ModelKind], FAIL_FAST] | None = Field(
        default=None, min_length=1, description="Kinds of model it may use: `base`, `instruct`."
    )
    rate_limit: str | None = Field(default=None, description="Requests it may make, such as `60/minute`.")
    max_concurrent: int | None = Field(
        default=None, ge=1, le=100_000, description="Requests it may have in progress at once."
    )
    token_budget: TokenBudget | None = Field(default=None, description="Tokens it may use per period.")

    @field_validator("models")
    @classmethod
    def _served_names(cls, value: list[str] | None) -> list[str] | None:
        for name in value or []:
            if not MODEL_NAME.match(name):
                raise ValueError(f"{name[:130]!r} is not a model name (letters, digits and . _ : / -)")
        return sorted(set(value)) if value is not None else None

    @field_validator("kinds")
    @classmethod
    def _distinct(cls, value: list[ModelKind] | None) -> list[ModelKind] | None:
        return sorted(set(value)) if value is not None else None

    @field_validator("rate_limit")
    @classmethod
    def _parsable(cls, value: str | None) -> str | None:
        if value is None:
            return value
        requests, _ = rate_window(value)
        if requests < 1:
            raise ValueError(f"rate_limit {value[:64]!r} lets no request through: give at least 1 a period")
        if requests > MAX_RATE_REQUESTS:  # the store counts in 64-bit integers
            raise ValueError(f"rate_limit {value[:64]!r}: at most {MAX_RATE_REQUESTS:,} requests a period")
        if ZERO_PERIOD.search(value):  # `limits` reads 1/0second as 1/second
            raise ValueError(f"rate_limit {value[:64]!r}: a period of zero seconds lets nothing be counted")
        if any(separator in value for separator in ";,|"):  # `limits` would keep the first rate only
            raise ValueError(f"rate_limit {value[:64]!r}: give one rate (a key has one rate limit)")
        return value

    def refusal(self, model: ServedModel) -> Forbidden | None:
        """The 403 naming the rule that leaves `model` out, or None when the key may use it."""
        if self.models is not None and model.name not in self.models:
            return Forbidden(
                f"This API key may use only these models: {', '.join(self.models)}; "
                f"'{model.name}' is not one of them.",
                param="model",
                code="model_not_allowed",
            )
        if self.kinds is not None and model.kind not in self.kinds:
            allowed = " and ".join(kind.value for kind in self.kinds)
            return Forbidden(
                f"This API key may use {allowed} models only; '{model.name}' is a {model.kind.value} model"
                + (" (it continues text; use /complete or /v1/completions with a base key)."
                   if model.kind is ModelKind.BASE else " (chat; use /chat or /v1/chat/completions).")
                + " GET /v1/models lists the models this key may use.",
                param="model",
                code="kind_not_allowed",
            )  # fmt: skip
        return None

    def allows(self, model: ServedModel) -> bool:
        """Whether the key may use `model`."""
        return self.refusal(model) is None

    @property
    def limited(self) -> bool:
        """Whether any of its limits needs counting (rate, concurrency or budget)."""
        return bool(self.rate_limit or self.max_concurrent or self.token_budget)


@functools.lru_cache(maxsize=1024)
def rate_window(rate: str) -> tuple[int, float]:
    """`60/minute` as (60, 60.0): requests, and the seconds they are counted over."""
    from limits import parse

    try:
        item = parse(rate)
    except ValueError as exc:
        raise ValueError(
            f"rate_limit {rate[:64]!r}: expected a rate such as `60/minute` or `10/second`"
        ) from exc
    return int(item.amount), float(item.get_expiry())


def rate_bucket(seconds: float, now: float) -> int:
    """The step of a rate's moving window that `now` falls in."""
    return math.floor(now / (seconds / RATE_BUCKETS))


class NewKey(KeyPolicy):
    """POST /keys: a key's name and its policy."""

    name: str = Field(min_length=1, max_length=128, description="What the key is for (shown in listings).")

    @field_validator("name")
    @classmethod
    def _printable(cls, value: str) -> str:
        if not value.isprintable():  # NUL and other control characters: the store and logs refuse them
            raise ValueError("a key's name holds printable characters only (no control characters)")
        return value

    def policy(self) -> KeyPolicy:
        """The policy part."""
        return KeyPolicy(**self.model_dump(exclude={"name"}))

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.ops.settings import ModelKind, ModelSpec, Settings


def test_defaults_serve_the_two_packaged_models() -> None:
    settings = Settings()
    assert [(m.name, m.kind) for m in settings.models] == [
        ("gemma-3-270m", ModelKind.BASE),
        ("smollm2-135m-instruct", ModelKind.INSTRUCT),
    ]
    assert all(m.embedded and m.max_model_len == 2048 for m in settings.models)
    assert (settings.host, settings.port) == ("127.0.0.1", 8000)


def test_environment_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_PORT", "9123")
    monkeypatch.setenv("GATEWAY_DEFAULT_MAX_TOKENS", "64")
    settings = Settings()
    assert (settings.port, settings.default_max_tokens) == (9123, 64)


def test_models_file_lists_external_and_embedded_models(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = tmp_path / "models.yaml"
    models.write_text(
        """
models:
  - name: llama-base
    kind: base
    tokenizer: /srv/tokenizers/llama
    urls: ["http://10.0.0.5:8000", "http://10.0.0.6:8000"]
  - name: local-chat
    kind: instruct
    source: /srv/models/chat
    replicas: 2
    engine_args: ["--max-num-seqs", "8"]
"""
    )
    monkeypatch.setenv("GATEWAY_MODELS_FILE", str(models))
    settings = Settings()
    external, embedded = settings.models
    assert not external.embedded and [str(u) for u in external.urls] == [
        "http://10.0.0.5:8000/",
        "http://10.0.0.6:8000/",
    ]
    assert embedded.embedded and embedded.replicas == 2 and embedded.engine_args == ["--max-num-seqs", "8"]


@pytest.mark.parametrize(
    ("content", "field"),
    [
        ("models: [{name: a, kind: chatty, source: /x}]", "kind"),
        ("models: [{name: a, kind: base}]", "source"),
        ("models: [{name: a, kind: base, urls: ['http://h:1']}]", "tokenizer"),
        ("models: [{name: a, kind: base, source: /x}, {name: a, kind: base, source: /y}]", "duplicate"),
        ("models: [{name: a, kind: base, source: /x, replicas: 0}]", "replicas"),
        ("models: [{name: a, kind: base, source: /x, colour: red}]", "colour"),
        ("models: {}", "models"),
        ("models: [", "models_file"),
    ],
)
def test_invalid_models_file_names_the_problem(tmp_path: Path, content: str, field: str) -> None:
    path = tmp_path / "models.yaml"
    path.write_text(content)
    with pytest.raises(ValidationError) as caught:
        Settings(models_file=path)
    assert field in str(caught.value)


def test_invalid_setting_names_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_LOG_LEVEL", "chatty")
    with pytest.raises(ValidationError, match="log_level"):
        Settings()


def test_builtin_sources_resolve_into_the_cache(tmp_path: Path) -> None:
    settings = Settings(cache_dir=tmp_path)
    assert settings.resolve_source("builtin:gemma-3-270m") == str(tmp_path / "models" / "gemma-3-270m")
    assert settings.resolve_source("/srv/model") == "/srv/model"


def test_tokenizer_source_falls_back_to_source() -> None:
    spec = ModelSpec(name="m", kind=ModelKind.BASE, source="/srv/m")
    assert spec.tokenizer_source == "/srv/m"

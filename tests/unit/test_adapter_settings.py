"""Adapters in the models list: read from their folders at start-up, refused with a message naming the
field when they cannot be served, and LoRA limits that fit them by default."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from service.core.adapter_checks import AdapterRequest
from service.ops import lora
from service.ops.lora import AdapterFolderError, fit_rank, read_lora, read_template, same_base
from service.ops.settings import ModelKind, ModelSpec, Settings
from tests.adapters import CHATML, adapter_folder


def model(**fields: Any) -> dict[str, Any]:
    return {"name": "gemma", "kind": "base", "source": "/srv/gemma", **fields}


def refusal(**fields: Any) -> str:
    with pytest.raises(ValidationError) as caught:
        Settings(models=[model(**fields)])
    return str(caught.value)


def test_configured_adapters_read_their_rank_and_set_the_workers_limits(tmp_path: Path) -> None:
    qa = adapter_folder(tmp_path, "qa", rank=8)
    wide = adapter_folder(tmp_path, "wide", rank=20, template=CHATML)
    settings = Settings(models=[model(adapters=[
        {"name": "qa", "path": str(qa)},
        {"name": "chatty", "path": str(wide), "kind": "instruct", "description": "SFT"},
    ])])  # fmt: skip
    spec = settings.models[0]
    assert [(a.name, a.rank, spec.kind_of(a)) for a in spec.adapters] == [
        ("qa", 8, ModelKind.BASE),
        ("chatty", 20, ModelKind.INSTRUCT),
    ]
    assert spec.lora_enabled and spec.lora_max_rank == 32  # 20 rounded up to a rank vLLM takes
    assert spec.lora_slots == (2, 2)


def test_a_model_without_adapters_has_lora_off_unless_asked() -> None:
    plain = ModelSpec(**model())
    assert not plain.lora_enabled
    runtime = ModelSpec(**model(lora=True))
    assert runtime.lora_enabled and runtime.lora_max_rank == 16 and runtime.lora_slots == (1, 1)
    tuned = ModelSpec(**model(lora=True, max_loras=2, max_cpu_loras=6, max_lora_rank=64))
    assert (tuned.lora_max_rank, tuned.lora_slots) == (64, (2, 6))


@pytest.mark.parametrize(
    ("rank", "fitted"), [(1, 1), (2, 8), (8, 8), (9, 16), (33, 64), (300, 320), (512, 512)]
)
def test_ranks_round_up_to_one_vllm_takes(rank: int, fitted: int) -> None:
    assert fit_rank(rank) == fitted


def test_a_folder_without_a_lora_config_is_refused_naming_the_adapter(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    message = refusal(adapters=[{"name": "qa", "path": str(empty)}])
    assert "adapters.0" in message and "has no adapter_config.json" in message


def test_a_relative_path_or_a_missing_folder_is_refused(tmp_path: Path) -> None:
    assert "not an absolute path" in refusal(adapters=[{"name": "qa", "path": "adapters/qa"}])
    assert "not a folder" in refusal(adapters=[{"name": "qa", "path": str(tmp_path / "gone")}])


def test_an_adapter_of_another_kind_than_lora_is_refused(tmp_path: Path) -> None:
    prefix = adapter_folder(tmp_path, "prefix", peft_type="PREFIX_TUNING")
    assert "only LoRA adapters are served" in refusal(adapters=[{"name": "p", "path": str(prefix)}])
    dora = adapter_folder(tmp_path, "dora", use_dora=True)
    assert "DoRA" in refusal(adapters=[{"name": "d", "path": str(dora)}])
    broken = adapter_folder(tmp_path, "broken")
    (broken / "adapter_config.json").write_text("{not json")
    assert "cannot be read as JSON" in refusal(adapters=[{"name": "b", "path": str(broken)}])


def test_a_rank_over_the_maximum_is_refused_with_both_numbers(tmp_path: Path) -> None:
    wide = adapter_folder(tmp_path, "wide", rank=32)
    message = refusal(max_lora_rank=16, adapters=[{"name": "wide", "path": str(wide)}])
    assert "adapters.0 ('wide'): rank 32 is over max_lora_rank 16" in message


def test_lora_limits_vllm_would_refuse_are_refused_at_start_up() -> None:
    assert "max_lora_rank 12 is not one vLLM takes" in refusal(lora=True, max_lora_rank=12)
    assert "max_cpu_loras (1) is below max_loras (2)" in refusal(lora=True, max_loras=2, max_cpu_loras=1)


def test_an_instruct_adapter_on_a_base_model_needs_a_chat_template(tmp_path: Path) -> None:
    bare = adapter_folder(tmp_path, "bare")
    message = refusal(adapters=[{"name": "sft", "path": str(bare), "kind": "instruct"}])
    assert "adapters.0 ('sft'): an instruct adapter on a base model needs a chat template" in message
    template = bare / "chat.jinja"
    template.write_text(CHATML)
    spec = ModelSpec(**model(adapters=[{"name": "sft", "path": str(bare), "kind": "instruct",
                                        "chat_template": str(template)}]))  # fmt: skip
    assert spec.kind_of(spec.adapters[0]) is ModelKind.INSTRUCT
    missing = {"name": "sft", "path": str(bare), "kind": "instruct", "chat_template": str(tmp_path / "no")}
    assert "chat_template" in refusal(adapters=[missing])


def test_the_template_is_found_as_transformers_finds_a_tokenizers(tmp_path: Path) -> None:
    own = adapter_folder(tmp_path, "own", template="OWN")
    assert read_template(own) == "OWN"
    configured = adapter_folder(tmp_path, "configured")
    (configured / "tokenizer_config.json").write_text(json.dumps({"chat_template": "CONFIG"}))
    assert read_template(configured) == "CONFIG"
    named = adapter_folder(tmp_path, "named")
    templates = [{"name": "tools", "template": "T"}, {"name": "default", "template": "D"}]
    (named / "tokenizer_config.json").write_text(json.dumps({"chat_template": templates}))
    assert read_template(named) == "D"
    explicit = own / "explicit.jinja"
    explicit.write_text("EXPLICIT")
    assert read_template(own, explicit) == "EXPLICIT"
    assert read_template(adapter_folder(tmp_path, "none")) is None


@pytest.mark.parametrize("where", ["/proc/self/environ", "/etc/os-release", "../outside.jinja"])
def test_a_template_file_outside_the_adapters_folder_is_refused(tmp_path: Path, where: str) -> None:
    """A template is shown to every client that renders a chat with it: a registration naming
    /proc/self/environ showed the gateway's keys to them (review of issue 20)."""
    own = adapter_folder(tmp_path, "own")
    (tmp_path / "outside.jinja").write_text("OUTSIDE")
    with pytest.raises(AdapterFolderError, match="not in the adapter's folder"):
        read_template(own, own / where if where.startswith("..") else Path(where))


@pytest.mark.parametrize("default", ["chat_template.jinja", "tokenizer_config.json"])
def test_a_folders_own_template_linking_out_of_it_is_refused(tmp_path: Path, default: str) -> None:
    """The files found without being named obey the same rule: a folder whose chat_template.jinja linked to
    /etc/passwd showed that file to every client as the adapter's template (review of issue 20, s27)."""
    content = "SECRET" if default.endswith(".jinja") else json.dumps({"chat_template": "SECRET"})
    (tmp_path / "secret").write_text(content)
    own = adapter_folder(tmp_path, "own")
    (own / default).symlink_to(tmp_path / "secret")
    with pytest.raises(AdapterFolderError, match=r"not in the adapter's folder .*\(links are followed"):
        read_template(own)
    (own / "kept").write_text(content)
    (own / default).unlink()
    (own / default).symlink_to(own / "kept")  # a link that stays in the folder is read
    assert read_template(own) == "SECRET"


@pytest.mark.parametrize("swapped", ["file", "folder"])
def test_a_link_swapped_in_after_the_check_is_refused_on_the_open_file(
    tmp_path: Path, swapped: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check of where a template lies holds for the file actually opened (review, s27: a check, then
    an open by name, let a link swapped in between through)."""
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "chat.jinja").write_text("SECRET")
    own = adapter_folder(tmp_path, "own")
    if swapped == "file":
        (own / "chat.jinja").symlink_to(tmp_path / "secret" / "chat.jinja")
    else:
        (own / "sub").symlink_to(tmp_path / "secret")
    named = own / "chat.jinja" if swapped == "file" else own / "sub" / "chat.jinja"
    checks = iter([lambda folder, path: path])  # the first check passes: the link came after it
    real = lora._inside
    monkeypatch.setattr(lora, "_inside", lambda folder, path: next(checks, real)(folder, path))
    with pytest.raises(AdapterFolderError, match=r"cannot be read|not in the adapter's folder"):
        read_template(own, named)


def test_a_template_that_is_no_regular_file_is_refused_without_waiting(tmp_path: Path) -> None:
    own = adapter_folder(tmp_path, "own")
    os.mkfifo(own / "chat.jinja")  # nobody writes: an open for reading would wait for ever
    with pytest.raises(AdapterFolderError, match="not a regular file"):
        read_template(own, own / "chat.jinja")


def test_what_a_folder_holds_is_read_no_further_than_its_cap_and_as_text(tmp_path: Path) -> None:
    own = adapter_folder(tmp_path, "own")
    (own / "binary.jinja").write_bytes(b"\xff\xfe{{ x }}\x00\x81")
    with pytest.raises(AdapterFolderError, match="not UTF-8"):
        read_template(own, own / "binary.jinja")
    (own / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)  # a RecursionError to parse
    with pytest.raises(AdapterFolderError, match="cannot be read as JSON"):
        read_lora(own)


def test_the_name_usage_gives_requests_for_no_model_is_reserved(tmp_path: Path) -> None:
    """An adapter named `unknown` merged its usage with every refused request's (review, s27)."""
    qa = adapter_folder(tmp_path, "qa")
    with pytest.raises(ValidationError, match="'unknown' is reserved"):
        Settings(models=[model(adapters=[{"name": "unknown", "path": str(qa)}])])
    with pytest.raises(ValidationError, match="'unknown' is reserved"):
        AdapterRequest(model="gemma", name="unknown", path=str(qa))


def test_names_are_unique_across_models_and_adapters(tmp_path: Path) -> None:
    qa = adapter_folder(tmp_path, "qa")
    with pytest.raises(ValidationError, match=r"duplicate names \['chat'\]"):
        Settings(models=[
            model(adapters=[{"name": "chat", "path": str(qa)}]),
            {"name": "chat", "kind": "instruct", "source": "/srv/chat"},
        ])  # fmt: skip
    with pytest.raises(ValidationError, match="the name is taken"):
        Settings(models=[model(adapters=[{"name": "gemma", "path": str(qa)}])])
    with pytest.raises(ValidationError, match="the name is taken"):
        Settings(models=[model(adapters=[{"name": "qa", "path": str(qa)}, {"name": "qa", "path": str(qa)}])])


def test_an_adapter_trained_from_another_model_is_refused_where_that_can_be_told(tmp_path: Path) -> None:
    gemma = tmp_path / "models" / "gemma-3-270m"
    gemma.mkdir(parents=True)
    mine = adapter_folder(tmp_path, "mine", base=str(gemma))
    other = adapter_folder(tmp_path, "other", base="/srv/llama")
    hub = adapter_folder(tmp_path, "hub", base="google/gemma-3-270m")
    builtin = {"name": "g", "kind": "base", "source": "builtin:gemma-3-270m"}
    settings = Settings(cache_dir=tmp_path, models=[{**builtin, "adapters": [
        {"name": "mine", "path": str(mine)}, {"name": "hub", "path": str(hub)}]}])  # fmt: skip
    assert [a.name for a in settings.models[0].adapters] == ["mine", "hub"]  # a hub id: cannot be told
    with pytest.raises(ValidationError, match=r"adapters.0 \('o'\) was trained from /srv/llama"):
        Settings(cache_dir=tmp_path, models=[{**builtin, "adapters": [{"name": "o", "path": str(other)}]}])


def test_base_models_compare_as_folders_or_as_hub_ids() -> None:
    assert same_base("/srv/gemma/", ["/srv/gemma"]) is True
    assert same_base("/srv/llama", ["/srv/gemma"]) is False
    assert same_base("Google/Gemma-3-270m", ["google/gemma-3-270m"]) is True
    assert same_base("meta/llama", ["google/gemma-3-270m"]) is False
    assert same_base("google/gemma-3-270m", ["/srv/gemma"]) is None
    assert same_base(None, ["/srv/gemma"]) is None
    for odd in ("~nobody-here/../x", "/x\u0000y"):  # review, s27: a 500, and a traceback at start-up
        assert same_base(odd, ["/srv/gemma"]) is False
    assert same_base("/srv/llama", ["/srv/gemma", "/srv/llama"]) is True  # as configured, or as reported

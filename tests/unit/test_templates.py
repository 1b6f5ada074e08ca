"""Tokenization rules on the real prepared tokenizers (prepared by `make test`)."""

from __future__ import annotations

import pytest

from service.errors import InvalidRequest
from service.settings import ModelKind, ModelSpec, Settings
from service.templates import ModelTokenizer, load_tokenizer

BOS = 2


@pytest.fixture(scope="module")
def gemma() -> ModelTokenizer:
    spec = ModelSpec(name="gemma-3-270m", kind=ModelKind.BASE, source="builtin:gemma-3-270m")
    return load_tokenizer(spec, Settings())


@pytest.fixture(scope="module")
def smollm() -> ModelTokenizer:
    spec = ModelSpec(name="smollm", kind=ModelKind.INSTRUCT, source="builtin:smollm2-135m-instruct")
    return load_tokenizer(spec, Settings())


@pytest.mark.parametrize("prompt", ["Hello", "<bos>Hello", "<bos><bos>Hello"])
def test_base_prompts_start_with_exactly_one_bos(gemma: ModelTokenizer, prompt: str) -> None:
    ids = gemma.encode(prompt)
    assert ids[0] == BOS and ids.count(BOS) == 1
    assert ids == gemma.encode("Hello")


def test_base_model_has_no_chat_template(gemma: ModelTokenizer) -> None:
    assert gemma.chat_template is None


def test_chat_rendering_writes_chatml_without_a_bos_of_its_own(smollm: ModelTokenizer) -> None:
    rendered = smollm.render_chat([{"role": "user", "content": "Hi"}])
    assert rendered.text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert smollm.decode(rendered.token_ids) == rendered.text
    assert not smollm.adds_bos


def test_override_template_file_is_used(tmp_path: pytest.TempPathFactory) -> None:
    template = tmp_path / "t.jinja"  # type: ignore[operator]
    template.write_text("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}[assistant]")
    spec = ModelSpec(
        name="x", kind=ModelKind.INSTRUCT, source="builtin:smollm2-135m-instruct", chat_template=template
    )
    rendered = load_tokenizer(spec, Settings()).render_chat([{"role": "user", "content": "Hi"}])
    assert rendered.text == "[user] Hi\n[assistant]"


def test_templates_are_sandboxed(tmp_path: pytest.TempPathFactory) -> None:
    template = tmp_path / "evil.jinja"  # type: ignore[operator]
    template.write_text("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    spec = ModelSpec(
        name="x", kind=ModelKind.INSTRUCT, source="builtin:smollm2-135m-instruct", chat_template=template
    )
    with pytest.raises(InvalidRequest, match="unsafe"):
        load_tokenizer(spec, Settings()).render_chat([{"role": "user", "content": "Hi"}])


@pytest.mark.parametrize(
    "text", ["Hello world", "  spaces\n\nnew lines ✓ ünïcödé", "<bos>Hi", "<|im_start|>x"]
)
def test_fast_encoding_matches_transformers(gemma: ModelTokenizer, smollm: ModelTokenizer, text: str) -> None:
    for tokenizer in (gemma, smollm):
        expected = tokenizer._tokenizer(text).input_ids
        assert tokenizer.encode(text) == tokenizer._single_bos(list(expected))
        plain = tokenizer._tokenizer(text, add_special_tokens=False).input_ids
        assert tokenizer.encode(text, add_special_tokens=False) == tokenizer._single_bos(list(plain))

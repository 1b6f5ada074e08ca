"""The docs: the configuration reference is complete, every documented command is one the suite runs or
checks, every documented answer is a valid template, the README stays a newcomer's page."""

from __future__ import annotations

import re
import shlex

import pytest
import yaml

from docs.hooks import model_fields_table, render, settings_table
from service.cli import build_parser
from service.ops.settings import ModelSpec, Settings
from tests import doc_examples as docs

ROOT = docs.ROOT
SH_COMMANDS = [
    (example.id, command) for example in docs.examples() for command in docs.iter_commands(example)
]


def test_every_setting_and_model_field_is_documented_with_a_description() -> None:
    undocumented = [name for name, field in Settings.model_fields.items() if not field.description]
    undocumented += [name for name, field in ModelSpec.model_fields.items() if not field.description]
    assert not undocumented
    page = render((ROOT / "docs/operations/configuration.md").read_text())
    assert all(f"`GATEWAY_{name.upper()}`" in page for name in Settings.model_fields)
    assert all(f"| `{name}` |" in page for name in ModelSpec.model_fields)
    assert "{{" not in page


def test_the_generated_tables_show_readable_defaults() -> None:
    table = settings_table()
    assert "| `GATEWAY_PORT` | `8000` |" in table
    assert "| `GATEWAY_CACHE_DIR` | `~/.cache/llm-gateway` |" in table
    assert "| `GATEWAY_API_KEYS` | empty |" in table
    assert "| `kind` | required |" in model_fields_table()


def test_readme_is_a_newcomers_page_with_the_two_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "make run" in readme and "make test" in readme
    assert len(readme.splitlines()) <= 260


def test_example_models_file_loads() -> None:
    settings = Settings(models_file=ROOT / "deploy" / "models.example.yaml")
    assert [m.name for m in settings.models] == ["gemma-3-270m", "smollm2-135m-instruct"]


@pytest.mark.parametrize(("where", "command"), SH_COMMANDS, ids=[f"{w} {c[:40]}" for w, c in SH_COMMANDS])
def test_every_documented_command_is_run_or_checked(where: str, command: str) -> None:
    """Programs the e2e tier runs against the real stack, or commands checked here (no Docker here)."""
    name = docs.program(command)
    assert name in docs.RUNNABLE + docs.STATIC, f"{where}: nothing runs or checks {command!r}"
    _, argv = docs.split_command(command)
    if name == "make":
        targets = set(re.findall(r"^([a-z][a-z0-9-]*):", (ROOT / "Makefile").read_text(), flags=re.M))
        assert set(argv[1:]) <= targets, f"{where}: no such make target in {argv[1:]}"
    elif name == "llm-gateway":
        build_parser().parse_args(argv[1:])  # exits 2 on options it does not take
        _files_exist(argv, where)
    elif name == "docker":
        _check_compose(argv, where)
    elif name == "kubectl":
        _files_exist(argv, where)


def _files_exist(argv: list[str], where: str) -> None:
    for flag in ("--models-file", "-k", "-f"):
        if flag in argv:
            path = ROOT / argv[argv.index(flag) + 1]
            assert path.exists(), f"{where}: {path} does not exist"


def _check_compose(argv: list[str], where: str) -> None:
    assert argv[1] == "compose", f"{where}: only `docker compose` is documented"
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    profiles = {p for service in compose["services"].values() for p in service.get("profiles", [])}
    asked = [argv[i + 1] for i, arg in enumerate(argv) if arg == "--profile"]
    assert set(asked) <= profiles, f"{where}: unknown compose profile in {asked}"
    _files_exist(argv, where)
    for scale in (argv[i + 1] for i, arg in enumerate(argv) if arg == "--scale"):
        assert scale.split("=")[0] in compose["services"], f"{where}: no service {scale}"


def test_every_documented_answer_is_a_valid_template() -> None:
    for example in docs.examples():
        if example.answer is None:
            continue
        text = example.answer.text
        if example.answer.lang == "json":
            assert not docs.mismatches(text, text), example.answer.where
        assert text.strip(), f"{example.answer.where}: empty answer"


def test_templates_match_as_documented() -> None:
    assert not docs.mismatches('{"a": "…", "b": [1, "…"], "c": "Par…", "d": 0.25}',
                               '{"a": 3, "b": [1, 2, 3], "c": "Paris", "d": 0.2512, "e": 1}')  # fmt: skip
    assert docs.mismatches('{"b": [1]}', '{"b": [1, 2]}')
    assert docs.mismatches('{"c": "Par…"}', '{"c": "Lyon"}')
    assert docs.mismatches('{"d": 0.25}', '{"d": 0.26}')
    assert not docs.mismatches(
        'data: {"a": 1}\n…\ndata: [DONE]', 'data: {"a": 1, "b": 2}\nx\ny\ndata: [DONE]'
    )
    assert docs.mismatches("data: [DONE]", "data: {}\ndata: [DONE]")


def test_commands_are_read_as_a_shell_reads_them() -> None:
    text = 'curl -s a \\\n  -d \'{"x": "# not a comment"}\'  # a comment\n# only a comment\nmake run'
    found = docs.commands(text)
    argvs = [docs.split_command(command)[1] for command in found]
    assert argvs == [["curl", "-s", "a", "-d", '{"x": "# not a comment"}'], ["make", "run"]]
    assert docs.split_command("A=1 B=two make run") == ({"A": "1", "B": "two"}, ["make", "run"])
    assert shlex.split(docs.at("curl localhost:8000/x", "http://127.0.0.1:9")) == ["curl", "127.0.0.1:9/x"]


def test_every_docs_page_is_in_the_site_navigation() -> None:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text().replace("!!python", "#"))
    listed: set[str] = set()

    def walk(node: object) -> None:
        if isinstance(node, str):
            listed.add(node)
        elif isinstance(node, list):
            for item in node:
                walk(item)
        elif isinstance(node, dict):
            for item in node.values():
                walk(item)

    walk(config["nav"])
    pages = {str(p.relative_to(ROOT / "docs")) for p in (ROOT / "docs").rglob("*.md")} - {
        str(p.relative_to(ROOT / "docs")) for p in (ROOT / "docs" / "notes").rglob("*.md")
    }
    assert pages == listed, pages ^ listed

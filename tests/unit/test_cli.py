"""The command line: options where its help shows them, --version, and one line (never a traceback) for
every bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from service import __version__
from service.cli import build_parser, main

ROOT = Path(__file__).parents[2]
MODELS = str(ROOT / "deploy" / "models.example.yaml")


@pytest.mark.parametrize(
    "argv",
    [["serve", "--models-file", MODELS], ["--models-file", MODELS, "serve"],
     ["prepare", "--models-file", MODELS], ["render", "--models-file", MODELS, "[]"],
     ["serve", "--host", "0.0.0.0", "--port", "9000"]],
)  # fmt: skip
def test_options_are_taken_where_the_help_shows_them(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    if "--models-file" in argv:
        assert args.models_file == MODELS


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"llm-gateway {__version__}"


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["render", "--model", "nope", "[]"],
         "no model named 'nope' (models: gemma-3-270m, smollm2-135m-instruct)"),
        (["render", "not json"], "MESSAGES is not JSON"),
        (["render", '{"role": "user"}'], "MESSAGES must be a JSON list"),
        (["render", "--model", "gemma-3-270m", "[]"], "'gemma-3-270m' is a base model"),
        (["--models-file", "/nonexistent.yaml", "prepare"],
         "invalid configuration: models_file /nonexistent.yaml"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_and_a_non_zero_exit(
    argv: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("llm-gateway: error: ") and says in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["keys", "list", "--url", "http://127.0.0.1:9"], "no admin key: set GATEWAY_ADMIN_KEY"),
        (["keys", "list", "--url", "http://127.0.0.1:9", "--admin-key", "a"],
         "cannot reach the gateway at http://127.0.0.1:9"),
    ],
)  # fmt: skip
def test_keys_commands_say_what_is_wrong_in_one_line(
    argv: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("llm-gateway: error: ") and says in err and len(err.strip().splitlines()) == 1


def test_a_token_budget_is_tokens_per_period(capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(["keys", "create", "--name", "x", "--token-budget", "200_000/month",
                                      "--kinds", "instruct", "--models", "a, b"])  # fmt: skip
    assert args.token_budget == {"tokens": 200_000, "period": "month"}
    assert args.kinds == ["instruct"] and args.models == ["a", "b"]
    plain = build_parser().parse_args(["keys", "create", "--name", "x", "--token-budget", "5"])
    assert plain.token_budget == {"tokens": 5, "period": "day"}
    with pytest.raises(SystemExit):
        build_parser().parse_args(["keys", "create", "--name", "x", "--token-budget", "lots/week"])
    assert "expected TOKENS/day, TOKENS/month or TOKENS/none" in capsys.readouterr().err

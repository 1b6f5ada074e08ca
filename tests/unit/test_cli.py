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

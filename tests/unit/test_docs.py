"""The README documents every setting, and the example models file loads."""

from __future__ import annotations

from pathlib import Path

from service.ops.settings import ModelSpec, Settings

ROOT = Path(__file__).parents[2]


def test_every_setting_and_model_field_is_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [
        f"GATEWAY_{name.upper()}"
        for name in Settings.model_fields
        if f"`GATEWAY_{name.upper()}`" not in readme
    ]
    missing += [name for name in ModelSpec.model_fields if f"| `{name}` |" not in readme]
    assert not missing


def test_readme_gives_the_two_setup_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "make run" in readme and "make test" in readme


def test_example_models_file_loads() -> None:
    settings = Settings(models_file=ROOT / "deploy" / "models.example.yaml")
    assert [m.name for m in settings.models] == ["gemma-3-270m", "smollm2-135m-instruct"]

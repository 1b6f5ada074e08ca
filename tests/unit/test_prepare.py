"""Which prepared folders `prepare` keeps and which it redoes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.workers.prepare import BUILTINS, LAYOUT, MARKER, _is_prepared

MODEL = BUILTINS["gemma-3-270m"]


@pytest.mark.parametrize(
    ("marker", "kept"),
    [
        ({"sha256": MODEL.sha256, "gguf": MODEL.gguf_name, "layout": LAYOUT}, True),
        ({"sha256": MODEL.sha256, "gguf": MODEL.gguf_name}, False),  # made before the layout was recorded
        ({"sha256": MODEL.sha256, "layout": LAYOUT - 1}, False),
        ({"sha256": "0" * 64, "layout": LAYOUT}, False),
        (None, False),
    ],
)
def test_only_folders_of_this_layout_and_weights_are_kept(
    tmp_path: Path, marker: dict[str, object] | None, kept: bool
) -> None:
    if marker is not None:
        (tmp_path / MARKER).write_text(json.dumps(marker))
    assert _is_prepared(tmp_path, MODEL) is kept

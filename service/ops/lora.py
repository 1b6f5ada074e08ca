"""What the gateway reads of a LoRA adapter's folder (PEFT's `save_pretrained` layout): its
`adapter_config.json` (the rank, the base model it was trained from) and its chat template, each file
capped before it is read.

vLLM accepts only some ranks as `--max-lora-rank`; a worker must be started with one at least as
large as every adapter it will load, so the configured maximum is the largest rank rounded up to one
of them.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# vLLM's `MaxLoRARanks` (vllm/config/lora.py): the values `--max-lora-rank` takes.
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
DEFAULT_MAX_RANK = 16  # vLLM's own default
MAX_CONFIG_BYTES = 1 << 20  # an adapter_config.json is a few hundred bytes
MAX_TEMPLATE_BYTES = 256 * 1024  # the longest chat templates published are ~20 KB
CONFIG_FILE = "adapter_config.json"
TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"
# The files vLLM reads of an adapter (vllm/lora/lora_model.py): its config and one of these weights.
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin", "adapter_model.pt")

# What identifies the files a worker reads of an adapter: (name, size, digest of its start) of each present.
FolderFiles = tuple[tuple[str, int, str], ...]
FolderStats = tuple[tuple[str, int, int, int], ...]  # (name, size, mtime in ns, inode) of each present
CONTENT_BYTES = 1 << 20
# Never the files of any folder: what an adapter that cannot be served as it is now is compared with.
UNSERVABLE: FolderFiles = (("unservable", -1, ""),)


class AdapterFolderError(ValueError):
    """An adapter folder that cannot be served; the message says why, for a person."""


@dataclass(frozen=True)
class LoraFacts:
    """What an adapter's `adapter_config.json` says."""

    rank: int
    base_model: str | None  # `base_model_name_or_path`: the model it was trained from, if recorded


def fit_rank(rank: int) -> int:
    """The smallest rank vLLM accepts as `--max-lora-rank` that holds `rank`."""
    for allowed in VLLM_RANKS:
        if allowed >= rank:
            return allowed
    raise AdapterFolderError(f"rank {rank} is over the largest vLLM serves ({VLLM_RANKS[-1]})")


def read_capped(path: Path, limit: int, within: Path | None = None) -> str:
    """A text file's content (UTF-8), refused when over `limit` bytes: at most `limit` + 1 bytes are read,
    whatever size the file reports (files under /proc report none). Only a regular file is read: a pipe
    or a device named like one would hold the reader for ever. `within`: the file opened must lie in that
    folder, links resolved (checked on the open file, so a link swapped in meanwhile does not count)."""
    if within is not None:
        path = _inside(within, path)
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | (os.O_NOFOLLOW if within else 0))
    except OSError as exc:
        raise AdapterFolderError(f"{path} cannot be read ({exc.strerror})") from None
    with os.fdopen(descriptor, "rb") as handle:
        if within is not None:
            _inside(within, _opened(handle.fileno(), path))
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise AdapterFolderError(f"{path} is not a regular file")
        content = handle.read(limit + 1)
    if len(content) > limit:
        raise AdapterFolderError(f"{path} is over the {limit:,} bytes this gateway reads")
    try:
        return content.decode("utf-8")
    except UnicodeDecodeError:
        raise AdapterFolderError(f"{path} is not UTF-8 text") from None


def read_lora(folder: Path) -> LoraFacts:
    """The LoRA facts of an adapter folder; AdapterFolderError when it holds no LoRA adapter."""
    if not folder.is_absolute():
        raise AdapterFolderError(f"{folder} is not an absolute path (workers resolve paths on their own)")
    if not folder.is_dir():
        raise AdapterFolderError(f"{folder} is not a folder the gateway can see")
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise AdapterFolderError(f"{folder} has no {CONFIG_FILE}: not a PEFT adapter folder")
    try:
        config = json.loads(read_capped(config_path, MAX_CONFIG_BYTES))
    except (OSError, ValueError, RecursionError) as exc:
        if isinstance(exc, AdapterFolderError):
            raise
        raise AdapterFolderError(f"{config_path} cannot be read as JSON ({exc})") from None
    if not isinstance(config, dict):
        raise AdapterFolderError(f"{config_path} is not a JSON object")
    kind = config.get("peft_type")
    if str(kind).upper() != "LORA":
        raise AdapterFolderError(f"{config_path} describes a {kind!r} adapter; only LoRA adapters are served")
    if config.get("use_dora"):
        raise AdapterFolderError(f"{config_path} describes a DoRA adapter, which vLLM does not serve")
    rank = config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise AdapterFolderError(f"{config_path} has no valid rank `r` (found {rank!r})")
    base = config.get("base_model_name_or_path")
    return LoraFacts(rank, base if isinstance(base, str) and base else None)


def folder_stats(folder: Path) -> FolderStats:
    """What the file system says of the files a worker reads of the adapter in `folder` (name, size,
    mtime, inode of each present, links followed): cheap, to tell when to read them again."""
    found = []
    for name in (CONFIG_FILE, *WEIGHT_FILES):
        try:
            info = (folder / name).stat()
        except OSError:
            continue
        found.append((name, info.st_size, info.st_mtime_ns, info.st_ino))
    return tuple(found)


def folder_files(folder: Path) -> FolderFiles:
    """The files a worker reads of the adapter in `folder`, by content (name, size, SHA-256 of its first
    MiB, which holds a config whole and a weights file's header and first tensors): the same after a
    `touch` or a copy of the same bytes, not after a retrain, a truncation or another rank. () when none
    can be read."""
    found = []
    for name in (CONFIG_FILE, *WEIGHT_FILES):
        try:  # not blocking: a pipe or a device named like one must not hold the reader
            descriptor = os.open(folder / name, os.O_RDONLY | os.O_NONBLOCK)
        except OSError:
            continue
        with os.fdopen(descriptor, "rb") as handle:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode):
                return UNSERVABLE
            found.append((name, info.st_size, hashlib.sha256(handle.read(CONTENT_BYTES)).hexdigest()))
    return tuple(found)


def read_template(folder: Path, explicit: Path | None = None) -> str | None:
    """An adapter's chat template: the file given, else the folder's `chat_template.jinja`, else its
    `tokenizer_config.json`'s `chat_template` (as transformers reads a tokenizer folder); None if none.
    Every file read for it must lie in the adapter's folder, links resolved: a template is shown to every
    client that renders a chat with it, so it must never be any other file of the host."""
    if explicit is not None:
        return read_capped(explicit, MAX_TEMPLATE_BYTES, folder)
    template_file = folder / TEMPLATE_FILE
    if template_file.is_file():
        return read_capped(template_file, MAX_TEMPLATE_BYTES, folder)
    config_file = folder / TOKENIZER_CONFIG
    if not config_file.is_file():
        return None
    try:
        config = json.loads(read_capped(config_file, MAX_CONFIG_BYTES + MAX_TEMPLATE_BYTES, folder))
    except (ValueError, RecursionError) as exc:
        if isinstance(exc, AdapterFolderError):
            raise
        raise AdapterFolderError(f"{config_file} cannot be read as JSON ({exc})") from None
    return _named_default(config.get("chat_template")) if isinstance(config, dict) else None


def _inside(folder: Path, path: Path) -> Path:
    """`path` once its links are resolved, refused unless it still lies in the adapter's folder."""
    resolved = path.resolve()
    if not resolved.is_relative_to(folder.resolve()):
        raise AdapterFolderError(
            f"{path} is not in the adapter's folder {folder} (links are followed: copy the file into the"
            " folder rather than linking to it)"
        )
    return resolved


def _opened(descriptor: int, path: Path) -> Path:
    """The path of the file open as `descriptor`, as the kernel has it (`path` where /proc cannot say)."""
    try:
        return Path(os.readlink(f"/proc/self/fd/{descriptor}"))
    except OSError:
        return path


def _named_default(value: Any) -> str | None:
    """A config's `chat_template`: one template, or named templates of which "default" is used."""
    if isinstance(value, list):
        named = {item.get("name"): item.get("template") for item in value if isinstance(item, dict)}
        value = named.get("default")
    return value if isinstance(value, str) and value else None


def same_base(base: str | None, sources: list[str]) -> bool | None:
    """Whether an adapter trained from `base` fits a model loaded from any of `sources` (its weights'
    folder or hub id, as configured or as its worker reports it): True or False where that can be told
    (two folders, or two hub ids), None where it cannot (no base recorded, a folder against an id)."""
    if not base:
        return None
    told = False
    for source in sources:
        if _is_path(base) and _is_path(source):
            told = True
            if _same_folder(base, source):
                return True
        elif not _is_path(base) and not _is_path(source):
            told = True
            if base.strip("/").lower() == source.strip("/").lower():
                return True
    return False if told else None


def _is_path(text: str) -> bool:
    return text.startswith(("/", "./", "../", "~"))


def _same_folder(first: str, second: str) -> bool:
    # A config's path can name an unknown user's home (`~nobody/..`: RuntimeError), hold a NUL
    # (ValueError) or loop through links (OSError, RuntimeError): then compared as written.
    try:
        return Path(first).expanduser().resolve() == Path(second).expanduser().resolve()
    except (OSError, RuntimeError, ValueError):
        return first.rstrip("/") == second.rstrip("/")

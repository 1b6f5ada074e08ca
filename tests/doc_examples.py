"""The examples in README.md and docs/, read as the suite runs them.

Every fenced block is classified once, here:

- a `sh` block holds commands. Each command (backslash continuations joined, `# ...` comments and
  leading `VAR=value` assignments set aside) is run by the e2e tier when its program is one the suite can
  run against the real stack (`curl`, `llm-gateway`, `lm_eval`, `python`); `make`, `docker compose` and
  `kubectl` commands are checked statically (the make target exists, the files and profiles they name
  exist), since this machine has no Docker or cluster.
- a `python` block is a program run against the real stack.
- a block titled `Answer` (after a `sh` block) or `Output` (after a `python` block) is what the command
  prints, as a template (see `mismatches`): the suite compares it with what the real stack answered.

So an example that drifts from the product fails a test instead of misleading a reader.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import gateway_env
from tests.gateway_process import TEST_STORE

ROOT = Path(__file__).parents[1]
ELLIPSIS = "…"
FENCE = re.compile(r"^(?P<indent> *)(?P<fence>```+)(?P<info>[^`\n]*)$")
TITLE = re.compile(r'title="([^"]*)"')
ANSWER_TITLES = ("Answer", "Output")
RUNNABLE = ("curl", "llm-gateway", "lm_eval", "python")
STATIC = ("make", "docker", "kubectl")
# Pages whose examples manage keys: they run against a gateway with the operator API on, this its
# admin key (GATEWAY_ADMIN_KEYS), and a database of its own (their keys close the other gateways).
ADMIN_PAGES = ("docs/operations/tenants.md",)
ADMIN_KEY = "sk-admin-example"
# How the docs write the gateway's address; the suite replaces it with the test stack's.
ADDRESSES = ("http://localhost:8000", "http://127.0.0.1:8000", "localhost:8000", "127.0.0.1:8000")


@dataclass(frozen=True)
class Block:
    """One fenced code block of a Markdown file."""

    path: Path
    line: int
    lang: str
    title: str
    text: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


@dataclass(frozen=True)
class Example:
    """A runnable block, and the answer block that follows it (if any)."""

    block: Block
    answer: Block | None

    @property
    def id(self) -> str:
        return self.block.where

    @property
    def needs_admin(self) -> bool:
        """Whether it runs against the gateway with the operator API on."""
        return str(self.block.path.relative_to(ROOT)) in ADMIN_PAGES


def doc_files() -> list[Path]:
    """README.md and every page of the docs site."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file, in order."""
    found: list[Block] = []
    lines = path.read_text().splitlines()
    index = 0
    while index < len(lines):
        match = FENCE.match(lines[index])
        if not match:
            index += 1
            continue
        indent, fence, info = len(match["indent"]), match["fence"], match["info"].strip()
        body: list[str] = []
        start = index + 1
        index += 1
        while index < len(lines) and lines[index].strip() != fence:
            body.append(lines[index][indent:])
            index += 1
        lang = info.split(" ", 1)[0] if info else ""
        title = TITLE.search(info)
        found.append(Block(path, start, lang, title.group(1) if title else "", "\n".join(body)))
        index += 1
    return found


def examples(paths: list[Path] | None = None) -> list[Example]:
    """Every `sh` and `python` block, each with the answer block right after it."""
    found = []
    for path in paths or doc_files():
        file_blocks = blocks(path)
        for position, block in enumerate(file_blocks):
            if block.lang not in ("sh", "python") or block.title in ANSWER_TITLES:
                continue
            following = file_blocks[position + 1] if position + 1 < len(file_blocks) else None
            answer = following if following is not None and following.title in ANSWER_TITLES else None
            found.append(Example(block, answer))
    return found


def commands(text: str) -> list[str]:
    """The commands of a `sh` block as a shell reads them: a line ending in `\\` or inside an open quote
    goes on to the next; comments and blank lines are dropped."""
    result: list[str] = []
    buffer = ""
    for line in text.splitlines():
        buffer = f"{buffer}\n{line}" if buffer else line
        if buffer.endswith("\\"):
            buffer = buffer[:-1]
            continue
        try:
            argv = shlex.split(buffer, comments=True)
        except ValueError:  # an open quote: the command goes on
            continue
        if argv:
            result.append(buffer.strip())
        buffer = ""
    return result


def split_command(command: str) -> tuple[dict[str, str], list[str]]:
    """A command's leading `VAR=value` assignments and its argv."""
    argv = shlex.split(command, comments=True)
    env: dict[str, str] = {}
    while argv and re.match(r"^[A-Z_][A-Z0-9_]*=", argv[0]):
        name, _, value = argv.pop(0).partition("=")
        env[name] = value
    return env, argv


def program(command: str) -> str:
    """The program a command runs (`.venv/bin/` and paths stripped)."""
    _, argv = split_command(command)
    return Path(argv[0]).name if argv else ""


def at(text: str, base_url: str) -> str:
    """`text` with the docs' gateway address replaced by `base_url` (`http://host:port`)."""
    for address in ADDRESSES:
        replacement = base_url if address.startswith("http") else base_url.removeprefix("http://")
        text = text.replace(address, replacement)
    return text


# ---------------------------------------------------------------- comparing answers with the docs


def mismatches(template: str, actual: str) -> list[str]:
    """How `actual` differs from the documented answer `template` (empty: it matches).

    A template that parses as JSON is compared as JSON (see `json_mismatches`); otherwise line by line:
    a line `…` stands for any number of lines, a line ending in `…` for any line with that beginning,
    and a line `data: {...}` (an event) is compared as JSON."""
    try:
        expected = json.loads(template)
    except ValueError:
        return _line_mismatches(_lines(template), _lines(actual))
    try:
        found = json.loads(actual)
    except ValueError:
        return [f"expected JSON, got {actual[:300]!r}"]
    return json_mismatches(expected, found, "$")


def json_mismatches(expected: Any, found: Any, where: str) -> list[str]:
    """JSON template rules: `"…"` is any value; a string ending in `…` is a prefix; a list whose last
    item is `"…"` is a prefix of the list; an object lists the keys that matter (others may be there,
    and a `"…": "…"` entry may say so);
    a float matches when it rounds to the documented digits."""
    if expected == ELLIPSIS:
        return []
    if isinstance(expected, dict):
        if not isinstance(found, dict):
            return [f"{where}: expected an object, got {found!r:.200}"]
        problems = []
        for key, value in expected.items():
            if key == ELLIPSIS:  # written as a reminder that more keys follow
                continue
            if key not in found:
                problems.append(f"{where}: missing key {key!r}")
            else:
                problems += json_mismatches(value, found[key], f"{where}.{key}")
        return problems
    if isinstance(expected, list):
        return _list_mismatches(expected, found, where)
    if isinstance(expected, str) and expected.endswith(ELLIPSIS):
        prefix = expected[: -len(ELLIPSIS)]
        ok = isinstance(found, str) and found.startswith(prefix)
        return [] if ok else [f"{where}: expected a string starting {prefix!r}, got {found!r:.200}"]
    if isinstance(expected, float) and isinstance(found, int | float) and not isinstance(found, bool):
        digits = len(repr(expected).split(".")[1]) if "." in repr(expected) else 0
        return [] if round(found, digits) == expected else [f"{where}: expected {expected}, got {found}"]
    return [] if expected == found else [f"{where}: expected {expected!r:.200}, got {found!r:.200}"]


def _list_mismatches(expected: list[Any], found: Any, where: str) -> list[str]:
    if not isinstance(found, list):
        return [f"{where}: expected a list, got {found!r:.200}"]
    open_ended = bool(expected) and expected[-1] == ELLIPSIS
    items = expected[:-1] if open_ended else expected
    if len(found) < len(items) or (not open_ended and len(found) != len(items)):
        return [f"{where}: expected {len(items)}{'+' if open_ended else ''} items, got {len(found)}"]
    return [p for i, item in enumerate(items) for p in json_mismatches(item, found[i], f"{where}[{i}]")]


def _lines(text: str) -> list[str]:
    """Non-blank lines (an event stream separates its events with blank ones)."""
    return [line for line in text.splitlines() if line.strip()]


def _line_mismatches(template: list[str], actual: list[str]) -> list[str]:
    """Match lines in order; `…` skips any number of lines (as few as the rest allows)."""
    if not template:
        return [] if not actual else [f"unexpected lines: {actual[:3]!r}"]
    head, rest = template[0], template[1:]
    if head.strip() == ELLIPSIS:
        for skip in range(len(actual) + 1):
            if not _line_mismatches(rest, actual[skip:]):
                return []
        return [f"nothing after {ELLIPSIS} matches {rest[:2]!r}"]
    if not actual:
        return [f"missing line {head!r}"]
    problem = _line_mismatch(head, actual[0])
    return [problem] if problem else _line_mismatches(rest, actual[1:])


def _line_mismatch(expected: str, found: str) -> str | None:
    if expected.startswith("data: {") and found.startswith("data: {"):
        problems = mismatches(expected.removeprefix("data: "), found.removeprefix("data: "))
        return "; ".join(problems) or None
    if expected.endswith(ELLIPSIS):
        return None if found.startswith(expected[: -len(ELLIPSIS)]) else f"{found!r} != {expected!r}"
    return None if found.rstrip() == expected.rstrip() else f"{found!r} != {expected!r}"


def iter_commands(example: Example) -> Iterator[str]:
    """The commands of an `sh` example (a python example has none)."""
    if example.block.lang == "sh":
        yield from commands(example.block.text)


# ---------------------------------------------------------------- running examples against a gateway


@dataclass(frozen=True)
class Ran:
    """What one command printed, and how it exited."""

    command: str
    code: int
    stdout: str
    stderr: str


def run_example(example: Example, base_url: str, timeout: float = 600) -> list[Ran]:
    """Run an example's runnable commands (or its program) against the gateway at `base_url`."""
    import subprocess
    import sys

    env = gateway_env(TEST_STORE)
    env.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if example.block.lang == "python":
        done = subprocess.run([sys.executable, "-c", at(example.block.text, base_url)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=timeout)  # fmt: skip
        return [Ran("python", done.returncode, done.stdout, done.stderr)]
    ran = []
    for command in commands(example.block.text):
        if program(command) not in RUNNABLE or _starts_a_server(command):
            continue
        extra, argv = split_command(at(command, base_url))
        argv[0] = _resolve(argv[0])
        done = subprocess.run(argv, cwd=ROOT, env={**env, **extra}, capture_output=True, text=True,
                              timeout=timeout)  # fmt: skip
        ran.append(Ran(command, done.returncode, done.stdout, done.stderr))
    return ran


def _starts_a_server(command: str) -> bool:
    """`llm-gateway serve` would start a second gateway: the suite checks its arguments instead."""
    _, argv = split_command(command)
    return program(command) == "llm-gateway" and "serve" in argv


def _resolve(name: str) -> str:
    """The project's own copy of a program (`.venv/bin/...`), else the name as it is."""
    import sys

    local = Path(sys.executable).parent / Path(name).name
    return str(local) if local.exists() else name


if __name__ == "__main__":  # print what every example answers now: `python -m tests.doc_examples URL`
    import sys

    url = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8000"
    only = sys.argv[2] if len(sys.argv) > 2 else ""
    for item in examples():
        if only not in item.id:
            continue
        for result in run_example(item, url):
            print(f"== {item.id} ({result.command[:60]}) exit {result.code}")
            print(result.stdout.rstrip())
            if result.code:
                print(result.stderr.rstrip()[-2000:])

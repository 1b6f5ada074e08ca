"""Score several served models (a base model and its adapters, say) on the same lm-eval tasks through
the gateway, in one run, and print one table.

    .venv/bin/python docs/examples/lm-eval/compare.py gemma-3-270m gemma-geo gemma-chat --tasks capitals

Each model is evaluated by lm-evaluation-harness's `local-completions` on `/v1/completions` with the
gateway's remote tokenizer (no model hub needed); an adapter is named like any model. Run it from the
repository's root (the example task's data file is relative to it).
"""

from __future__ import annotations

import argparse
import json
import os
import urllib.request
from pathlib import Path
from typing import Any

TASKS = Path(__file__).parent


def served(url: str, key: str | None) -> dict[str, dict[str, Any]]:
    """The gateway's `/v1/models` entries by name (kind, parent)."""
    request = urllib.request.Request(f"{url}/v1/models", headers=_auth(key))
    with urllib.request.urlopen(request, timeout=30) as answer:
        return {entry["id"]: entry for entry in json.loads(answer.read())["data"]}


def evaluate(model: str, tasks: list[str], url: str, key: str | None, include: Path) -> dict[str, Any]:
    """lm-eval's results for one served model: {task: {metric: value}}."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    args = {
        "model": model, "base_url": f"{url}/v1/completions", "tokenizer_backend": "remote",
        "tokenized_requests": True, "num_concurrent": 1, "max_retries": 1,
    }  # fmt: skip
    if key:
        args["api_key"] = key
    results = lm_eval.simple_evaluate(
        model="local-completions", model_args=",".join(f"{k}={v}" for k, v in args.items()),
        tasks=tasks, task_manager=TaskManager(include_path=str(include)), batch_size=1,
    )  # fmt: skip
    assert results is not None
    found: dict[str, Any] = results["results"]
    return found


def rows(model: str, entry: dict[str, Any], results: dict[str, Any]) -> list[list[str]]:
    """One table row per task and metric (stderr beside its metric)."""
    found = []
    for task, metrics in results.items():
        for name, value in metrics.items():
            metric, _, filter_ = name.partition(",")
            if not filter_ or metric.endswith("_stderr") or not isinstance(value, int | float):
                continue
            stderr = metrics.get(f"{metric}_stderr,{filter_}")
            spread = f"{stderr:.4f}" if isinstance(stderr, int | float) else "-"
            kind, parent = entry.get("kind", "?"), entry.get("parent") or "-"
            found.append([model, kind, parent, task, metric, f"{value:.4f}", spread])
    return found


def table(lines: list[list[str]]) -> str:
    """A Markdown table with aligned columns."""
    header = ["model", "kind", "parent", "task", "metric", "value", "stderr"]
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
    out = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(header, widths, strict=True)) + " |"]
    out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in lines:
        out.append("| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) + " |")
    return "\n".join(out)


def _auth(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="served names: models or adapters")
    parser.add_argument("--tasks", default="capitals", help="comma-separated lm-eval tasks")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the gateway")
    parser.add_argument("--include-path", type=Path, default=TASKS, help="folder of local task files")
    args = parser.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the local tasks need no hub
    key = os.environ.get("OPENAI_API_KEY")  # a client key, when the gateway asks for one
    url = args.url.rstrip("/")
    entries = served(url, key)
    missing = [model for model in args.models if model not in entries]
    if missing:
        raise SystemExit(f"not served by {url}: {', '.join(missing)} (served: {', '.join(entries)})")
    lines = []
    for model in args.models:
        results = evaluate(model, args.tasks.split(","), url, key, args.include_path)
        lines += rows(model, entries[model], results)
    print(table(lines))


if __name__ == "__main__":
    main()

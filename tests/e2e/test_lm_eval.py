"""lm-evaluation-harness `local-completions` on a small local multiple-choice task: through the
gateway with lm-eval's remote tokenizer (it reads /tokenizer_info, /tokenize and /detokenize from
the gateway: no local tokenizer at all), and against the worker directly with the model folder as
its tokenizer. Every per-sample loglikelihood must be identical."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import BASE_MODEL, Stack

ROOT = Path(__file__).parents[2]
TASK_DIR = ROOT / "docs" / "examples" / "lm-eval"  # the task the researchers' docs run


def evaluate(model_args: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> list[list[float]]:
    """Per-sample loglikelihood of every choice, in document order."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(ROOT)  # the task's data file is relative to the repository
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    args = ",".join(f"{key}={value}" for key, value in model_args.items())
    results = lm_eval.simple_evaluate(
        model="local-completions", model_args=args, tasks=["capitals"],
        task_manager=TaskManager(include_path=str(TASK_DIR)), log_samples=True, batch_size=1,
    )  # fmt: skip
    assert results is not None
    samples = sorted(results["samples"]["capitals"], key=lambda sample: sample["doc_id"])
    return [[float(resp[0][0]) for resp in sample["resps"]] for sample in samples]


def test_loglikelihoods_are_identical_through_the_gateway_and_direct(
    stack: Stack, model_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    common = {"model": BASE_MODEL, "num_concurrent": 1, "max_retries": 1, "tokenized_requests": True}
    through = evaluate(
        {**common, "base_url": f"{stack.url}/v1/completions", "tokenizer_backend": "remote"}, monkeypatch
    )
    worker = stack.worker_url(BASE_MODEL)
    direct = evaluate(
        {**common, "base_url": f"{worker}/v1/completions", "tokenizer_backend": "huggingface",
         "tokenizer": str(model_dirs[BASE_MODEL])},
        monkeypatch,
    )  # fmt: skip
    assert len(through) == 5 and all(len(choices) == 3 for choices in through)
    assert through == direct

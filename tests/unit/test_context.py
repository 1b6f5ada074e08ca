from __future__ import annotations

import pytest

from service.core.gateway import fit_max_tokens
from service.errors import ContextLengthExceeded


def test_omitted_max_tokens_fills_the_rest_up_to_the_cap() -> None:
    assert fit_max_tokens(100, None, 2048, 256) == 256
    assert fit_max_tokens(2000, None, 2048, 256) == 48


def test_requested_max_tokens_that_fits_is_kept() -> None:
    assert fit_max_tokens(100, 1948, 2048, 256) == 1948


def test_prompt_alone_over_the_context() -> None:
    with pytest.raises(ContextLengthExceeded) as caught:
        fit_max_tokens(2048, None, 2048, 256)
    assert caught.value.param == "prompt" and "2048 tokens" in caught.value.message


def test_prompt_plus_max_tokens_over_the_context() -> None:
    with pytest.raises(ContextLengthExceeded) as caught:
        fit_max_tokens(100, 1949, 2048, 256)
    assert caught.value.param == "max_tokens"
    assert "2049 tokens" in caught.value.message and "at most 1948" in caught.value.message

from pathlib import Path

import pytest

from tests.helpers_tokenizer import build_test_tokenizer


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved OPT-style byte-level BPE tokenizer (vocab 512, "</s>" BOS); see tests/helpers_tokenizer.py."""
    return build_test_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer"))

from pathlib import Path

import pytest
import torch

from tests.helpers_tokenizer import build_test_tokenizer


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved OPT-style byte-level BPE tokenizer (vocab 512, "</s>" BOS); see tests/helpers_tokenizer.py."""
    return build_test_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer"))


@pytest.fixture(scope="module")
def one_cpu_thread():
    """For modules of tiny tensors: on a 2-core runner, intra-op threads cost far more than they give."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

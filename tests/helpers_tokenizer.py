"""A tiny, deterministic byte-level BPE tokenizer shaped like OPT's, for CPU tests.

Trained with `tokenizers` on the text of tests/fixtures/c4_train_sample.jsonl (40 real C4
documents) by scripts/assets/tokenizer_utils.py train_bpe_tokenizer (the builder the tiny trained
models share). Special tokens get OPT's ids (<s>=0, <pad>=1, </s>=2, <unk>=3), and "</s>" is
added at the start of every encoding as OPT's BOS, so `tokenizer(text)` gives
[2, ...text tokens]. Offsets are not trimmed (trim_offsets=False, as GPT-2/OPT and Llama 3),
so a token "Ġword" covers its leading space. Saved with `save_pretrained`, loaded with
`AutoTokenizer.from_pretrained(path)`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from scripts.assets.tokenizer_utils import SPECIAL_TOKENS, train_bpe_tokenizer  # noqa: F401  (SPECIAL_TOKENS re-exported)

FIXTURES = Path(__file__).resolve().parent / "fixtures"
TRAIN_TEXT = FIXTURES / "c4_train_sample.jsonl"


def build_test_tokenizer(tmp_dir: str | os.PathLike, vocab_size: int = 512) -> Path:
    """Train the tokenizer, save it to `tmp_dir` (created if needed) and return that path."""
    with open(TRAIN_TEXT, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    tokenizer = train_bpe_tokenizer(texts, vocab_size)
    path = Path(tmp_dir)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(path)
    return path

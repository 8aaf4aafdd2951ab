"""A tiny, deterministic byte-level BPE tokenizer shaped like OPT's, for CPU tests.

Trained with `tokenizers` on the text of tests/fixtures/c4_train_sample.jsonl (40 real C4
documents). Special tokens get OPT's ids (<s>=0, <pad>=1, </s>=2, <unk>=3), and "</s>" is
added at the start of every encoding as OPT's BOS, so `tokenizer(text)` gives
[2, ...text tokens]. Offsets are not trimmed (trim_offsets=False, as GPT-2/OPT and Llama 3),
so a token "Ġword" covers its leading space. Saved with `save_pretrained`, loaded with
`AutoTokenizer.from_pretrained(path)`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent / "fixtures"
TRAIN_TEXT = FIXTURES / "c4_train_sample.jsonl"
SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>"]  # ids 0..3, as OPT


def build_test_tokenizer(tmp_dir: str | os.PathLike, vocab_size: int = 512) -> Path:
    """Train the tokenizer, save it to `tmp_dir` (created if needed) and return that path."""
    from tokenizers import ByteLevelBPETokenizer, processors
    from transformers import PreTrainedTokenizerFast

    with open(TRAIN_TEXT, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    bpe = ByteLevelBPETokenizer(add_prefix_space=False, trim_offsets=False)
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                            show_progress=False)
    bos_id = bpe.token_to_id("</s>")
    bpe.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="</s> $A", pair="</s> $A </s> $B", special_tokens=[("</s>", bos_id)]),
    ])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="</s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>")
    path = Path(tmp_dir)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(path)
    return path

"""The project's OPT-style byte-level BPE tokenizer, trained with `tokenizers` on given texts.

One builder for the test fixture (tests/helpers_tokenizer.py, 40 C4 documents, vocab 512) and
the tiny trained models (scripts/assets/train_tiny_models.py, 1,000 C4 documents, vocab 4096).
Special tokens get OPT's ids (<s>=0, <pad>=1, </s>=2, <unk>=3), and "</s>" is added at the
start of every encoding as OPT's BOS, so `tokenizer(text)` gives [2, ...text tokens]. Offsets
are not trimmed (trim_offsets=False, as GPT-2/OPT and Llama 3), so a token "Ġword" covers its
leading space.
"""
from __future__ import annotations

from typing import Sequence

from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>"]  # ids 0..3, as OPT
BOS_TOKEN = "</s>"  # OPT's BOS (and EOS)


def train_bpe_tokenizer(texts: Sequence[str], vocab_size: int, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts` and wrap it as a transformers tokenizer that prepends BOS."""
    from tokenizers import ByteLevelBPETokenizer, processors

    bpe = ByteLevelBPETokenizer(add_prefix_space=False, trim_offsets=False)
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
                            show_progress=False)
    bos_id = bpe.token_to_id(BOS_TOKEN)
    bpe.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
                                      special_tokens=[(BOS_TOKEN, bos_id)]),
    ])
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=BOS_TOKEN, eos_token=BOS_TOKEN,
                                   pad_token="<pad>", unk_token="<unk>")

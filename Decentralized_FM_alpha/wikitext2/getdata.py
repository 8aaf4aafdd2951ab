"""WikiText-2 raw test -> echo requests, one per non-overlapping token window, for perplexity.

    python Decentralized_FM_alpha/wikitext2/getdata.py --tokenizer pretrained_models/llama-3.2-3b
    python Decentralized_FM_alpha/wikitext2/getdata.py --tokenizer DIR \
        --input-file data/samples/wikitext2_test_joined.txt
    python Decentralized_FM_alpha/wikitext2/getdata.py --tokenizer DIR --from-hub

Convention (GPTQ/SparseGPT/TEAL style, adapted to requests):
- Text: "\\n\\n".join of the `wikitext-2-raw-v1` test rows (4,358 rows), read byte for byte
  from --input-file (default data/samples/wikitext2_test_joined.txt, bundled in the repo) or
  built from the hub with --from-hub. Tokenized once, without special tokens, with the model's tokenizer.
- Windows: W = --max-seq-len minus the special tokens the tokenizer adds to one sequence (1 for
  a BOS), so the runner's re-tokenized prompt, BOS included, fits in --max-seq-len. Windows do
  not overlap and leave no gap; each holds the next W tokens, except that a cut never splits the
  bytes of one character (the window then ends 1-3 tokens early); the last holds the rest.
- Requests: the prompt is the exact text span of the window (fast tokenizer offset mapping;
  the spans concatenated are the text), plus the extra key "window_token_count" = tokens in the
  window, special tokens excluded = the number of log-probs after the first that the runner
  returns when its re-tokenization reproduces the window.
- Each request also has "article": the index of the WikiText article holding the window's middle character
  (articles start at their ' = Title = ' line); perplexity intervals resample articles, not windows.
- perplexity = exp(mean NLL over every predicted token of every window): the first token of each
  request (the BOS) has no log-prob; every text token has one, conditioned only on the earlier
  tokens of its own window (scripts/analysis/perplexity.py). GPTQ instead predicts W-1 tokens per window
  with no BOS and drops the last partial window, so the numbers are close, not identical.

Re-tokenization: the runner re-tokenizes each prompt. Measured on wikitext2_test_joined.txt with
the test suite's byte-level BPE tokenizers (tests/helpers_tokenizer.py build_test_tokenizer,
trained on 40 C4 docs, vocab 512 and 8192), --max-seq-len 2048 / 512 / 128:
- with plain W-token cuts (the character rule above switched off), windows whose re-tokenized
  ids differ: vocab 512: 4 of 338, 4 of 1,354, 20 of 5,447; vocab 8192: 0 of 230, 2 of 919,
  8 of 3,695. Every one sat at a cut inside a multi-byte character ("–", "—", "é", "ǜ", a
  combining mark, Cyrillic, CJK); the lengths changed in +1/-1 pairs, so the longer window would overflow --max-seq-len.
- with the character rule (this code): 0 windows differ in all six settings, 0 to 11 windows per
  setting end 1-3 tokens early. Cuts inside words and whitespace runs re-tokenized identically.
Reproduce: python Decentralized_FM_alpha/wikitext2/getdata.py --tokenizer DIR --input-file
data/samples/wikitext2_test_joined.txt --max-seq-len 128, then read "retokenization"
in the manifest; the manifest records the same check for whatever tokenizer is used, and the
summary line prints it. Llama 3's pre-tokenizer differs from GPT-2's (digit groups, ignore_merges):
check its manifest.
"""
import argparse
import hashlib
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from Decentralized_FM_alpha.task_datasets.request_files import (  # noqa: E402
    ARTICLE_RULE, DEFAULT_MODEL, retokenization_check, token_windows, window_articles, window_length, window_requests,
    write_request_manifest, write_requests)
from Decentralized_FM_alpha.utils.manifest import base_manifest, file_sha256  # noqa: E402

DEFAULT_INPUT = Path("data/samples/wikitext2_test_joined.txt")
DEFAULT_TOKENIZER = Path("pretrained_models/llama-3.2-3b")
HUB_DATASET, HUB_CONFIG = "Salesforce/wikitext", "wikitext-2-raw-v1"


def hub_wikitext2_test_text() -> str:
    """The evaluation string exactly as GPTQ builds it: "\\n\\n".join(test rows)."""
    from datasets import load_dataset  # only the hub path needs `datasets`

    return "\n\n".join(load_dataset(HUB_DATASET, HUB_CONFIG, split="test")["text"])


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description="Write WikiText-2 raw test as echo requests, one per "
                                                 "non-overlapping token window, plus <output>.manifest.json.")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--input-file", type=Path, default=None,
                        help=f"the joined test text, read byte for byte as UTF-8 (default: {DEFAULT_INPUT} "
                             f"under the repo root)")
    source.add_argument("--from-hub", action="store_true",
                        help=f"build the text from the hub instead: \"\\n\\n\".join of {HUB_DATASET} "
                             f"{HUB_CONFIG} test rows")
    parser.add_argument("--tokenizer", type=Path, default=REPO_ROOT / DEFAULT_TOKENIZER,
                        help=f"local Hugging Face fast tokenizer directory of the model to evaluate, e.g. a "
                             f"converted checkpoint (default: {DEFAULT_TOKENIZER} under the repo root)")
    parser.add_argument("--max-seq-len", type=int, default=2048,
                        help="tokens per request including the special tokens the tokenizer adds (BOS); "
                             "windows hold at most this minus those (default: 2048)")
    parser.add_argument("--output", type=Path, default=None,
                        help="request file to write (replaced if it exists); default: "
                             "Decentralized_FM_alpha/wikitext2/wikitext2_test_<tokenizer dir name>_<max-seq-len>.jsonl")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"value of the informational \"model\" field of each request (default: {DEFAULT_MODEL})")
    args = parser.parse_args(argv)
    output = args.output or Path(__file__).resolve().parent / \
        f"wikitext2_test_{args.tokenizer.resolve().name}_{args.max_seq_len}.jsonl"

    manifest = base_manifest(kind="request_file", dataset="wikitext-2-raw-v1 test", max_seq_len=args.max_seq_len,
                             model=args.model)
    try:
        if args.from_hub:
            text = hub_wikitext2_test_text()
            manifest["source"] = {"kind": "hub", "dataset": HUB_DATASET, "config": HUB_CONFIG, "split": "test",
                                  "join": "\\n\\n", "text_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}
        else:
            input_file = args.input_file or REPO_ROOT / DEFAULT_INPUT
            if not input_file.is_file():
                raise FileNotFoundError(f"missing file: {input_file} (pass --input-file PATH or --from-hub)")
            with open(input_file, encoding="utf-8", newline="") as f:
                text = f.read()
            manifest["source"] = {"kind": "file", "path": str(input_file.resolve()), "sha256": file_sha256(input_file)}
        tokenizer_json = args.tokenizer / "tokenizer.json"
        if not tokenizer_json.is_file():
            raise FileNotFoundError(f"missing file: {tokenizer_json} (--tokenizer must be a local fast tokenizer "
                                    f"directory)")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        window_tokens = window_length(tokenizer, args.max_seq_len)
        windows = token_windows(text, tokenizer, window_tokens)
        check = retokenization_check(text, windows, tokenizer)
        articles = window_articles(text, windows)
        count = write_requests(output, window_requests(text, windows, args.model, articles))
    except (OSError, ValueError) as e:
        parser.exit(1, f"{parser.prog}: error: {e}\n")
    manifest.update(text_chars=len(text), window_tokens=window_tokens, retokenization=check,
                    articles={"count": len(set(articles)), "rule": ARTICLE_RULE},
                    tokenizer={"path": str(args.tokenizer.resolve()),
                               "tokenizer_json_sha256": file_sha256(tokenizer_json),
                               "special_tokens_added": tokenizer.num_special_tokens_to_add(pair=False)})
    mpath = write_request_manifest(output, manifest, count)
    print(f"wrote {count} requests ({check['tokens']} tokens, windows of at most {window_tokens}; "
          f"{check['windows_ids_differing']} windows re-tokenize differently) to {output}; manifest {mpath}")
    return output


if __name__ == "__main__":
    main()

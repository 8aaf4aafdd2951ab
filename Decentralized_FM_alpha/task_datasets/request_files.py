"""Request files in the original DejaVu format (SPEC §4): C4 documents and WikiText-2 windows.

One request a line, exactly the keys and values of the original
`Decentralized_FM_alpha/c4_train/getdata.py` (FMInference/DejaVu):

    {"best_of": 1, "echo": true, "logprobs": 1, "max_tokens": 0, "model": "opt-175b", "n": 1,
     "prompt": <text>, "request_type": "language-model-inference", "stop": null,
     "temperature": 0, "top_p": 1}

`echo` with `max_tokens` 0 asks the runner for the log-prob of every prompt token; the
perplexity of a results file is computed by `task_datasets/results.py`. The `model` field is
informational (the original always wrote "opt-175b"; `--model` sets it).

C4 (`c4_train/getdata.py`, `c4_val/getdata.py`, both thin CLIs over `c4_getdata_main`):
- hub: `datasets.load_dataset("allenai/c4", "en", split=..., streaming=True)
  .shuffle(buffer_size=10000, seed=42)`, then the first N documents of that stream, as the
  original (which read the now-renamed hub id "c4").
- `--from-file PATH` (.jsonl with a "text" key per line, or .parquet with a "text" column):
  all documents are read, the row indices 0..n-1 are shuffled with
  `random.Random(seed).shuffle`, and the first N shuffled rows are written in that order.
  The selected row indices go into the manifest.
- Departures from the original, on purpose: the original wrote N+1 documents (it stopped
  after `idx == 500`, i.e. 501 train documents, and 10,001 validation documents) and appended
  to an existing file; here N is exact and the output file is replaced atomically.

WikiText-2 (`wikitext2/getdata.py`, convention in its docstring): `token_windows` cuts the
tokenized text into non-overlapping windows, `window_requests` writes one echo request per
window with the extra key "window_token_count".
"""
from __future__ import annotations

import argparse
import bisect
import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from Decentralized_FM_alpha.utils.manifest import base_manifest, file_sha256, now, write_json_atomic

DEFAULT_MODEL = "opt-175b"
C4_HUB_DATASET = "allenai/c4"
C4_HUB_CONFIG = "en"
C4_SHUFFLE_BUFFER = 10000
DEFAULT_SEED = 42


def make_echo_request(prompt: str, model: str = DEFAULT_MODEL) -> dict[str, Any]:
    """One scoring request (log-probs of every prompt token, nothing generated), original keys."""
    return {
        "best_of": 1,
        "echo": True,
        "logprobs": 1,
        "max_tokens": 0,
        "model": model,
        "n": 1,
        "prompt": prompt,
        "request_type": "language-model-inference",
        "stop": None,
        "temperature": 0,
        "top_p": 1,
    }


# ---------------------------------------------------------------- reading documents

def read_documents_file(path: str | os.PathLike) -> list[str]:
    """The "text" of every document of a .jsonl (one JSON object a line) or .parquet file, in file order.

    A missing file, a line that is not a JSON object with a string "text", or a parquet file
    without a "text" column (or with a null text) is an error that names the file and line/row.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing file: {path}")
    if path.suffix == ".jsonl":
        return _read_jsonl_texts(path)
    if path.suffix == ".parquet":
        return _read_parquet_texts(path)
    raise ValueError(f"{path}: unsupported file type {path.suffix!r}; expected .jsonl or .parquet")


def _read_jsonl_texts(path: Path) -> list[str]:
    texts = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({e.msg})") from e
            if not isinstance(obj, dict) or "text" not in obj:
                raise ValueError(f"{path}:{line_no}: no \"text\" key in this line")
            if not isinstance(obj["text"], str):
                raise ValueError(f"{path}:{line_no}: \"text\" is {type(obj['text']).__name__}, not a string")
            texts.append(obj["text"])
    return texts


def _read_parquet_texts(path: Path) -> list[str]:
    import pyarrow.parquet as pq  # comes with `datasets`; only needed for parquet input

    table = pq.read_table(path)
    if "text" not in table.column_names:
        raise ValueError(f"{path}: no \"text\" column (columns: {table.column_names})")
    texts = table.column("text").to_pylist()
    for row, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"{path}: row {row}: \"text\" is {type(text).__name__}, not a string")
    return texts


def select_rows(available: int, num_docs: int, seed: int) -> list[int]:
    """Row indices of `num_docs` documents out of `available`, shuffled with `seed` (0 = all of them).

    Asking for more documents than there are is an error, never a silent clamp.
    """
    if num_docs < 0:
        raise ValueError(f"--num-docs must be >= 0 (0 = all), got {num_docs}")
    if num_docs > available:
        raise ValueError(f"--num-docs {num_docs} but the source has only {available} documents "
                         f"(pass --num-docs {available} or --num-docs 0 for all)")
    rows = list(range(available))
    random.Random(seed).shuffle(rows)
    return rows[:num_docs] if num_docs else rows


def hub_c4_documents(split: str, num_docs: int, seed: int, shuffle_buffer: int) -> list[str]:
    """The first `num_docs` documents (0 = the whole split) of the shuffled allenai/c4 `en` stream."""
    from datasets import load_dataset  # only the hub path needs `datasets`
    from tqdm import tqdm

    if num_docs < 0:
        raise ValueError(f"--num-docs must be >= 0 (0 = all), got {num_docs}")
    stream = load_dataset(C4_HUB_DATASET, C4_HUB_CONFIG, split=split, streaming=True)
    stream = stream.shuffle(buffer_size=shuffle_buffer, seed=seed)
    texts = []
    for doc in tqdm(stream, total=num_docs or None, desc=f"c4 {split}", unit="doc"):
        texts.append(doc["text"])
        if len(texts) == num_docs:
            break
    if num_docs and len(texts) < num_docs:
        raise ValueError(f"--num-docs {num_docs} but {C4_HUB_DATASET} {split} yielded only {len(texts)} documents")
    return texts


# ---------------------------------------------------------------- writing

# json.dumps(ensure_ascii=False) leaves these line separators raw inside strings; str.splitlines()
# (and other JSONL readers) would split a request there, so they are written as \u escapes.
_LINE_SEPARATORS = {"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"}


def _json_line(obj: Any) -> str:
    line = json.dumps(obj, ensure_ascii=False)
    for raw, escaped in _LINE_SEPARATORS.items():
        line = line.replace(raw, escaped)
    return line + "\n"


def write_requests(path: str | os.PathLike, requests: Iterable[dict[str, Any]]) -> int:
    """Write requests as JSONL (UTF-8, one a line), replacing `path` atomically; returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    count = 0
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for request in requests:
            f.write(_json_line(request))
            count += 1
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return count


def manifest_path(output: str | os.PathLike) -> Path:
    return Path(str(output) + ".manifest.json")


def write_request_manifest(output: str | os.PathLike, manifest: dict[str, Any], num_requests: int) -> Path:
    """`<output>.manifest.json`: the caller's `base_manifest(...)` plus what was written."""
    path = manifest_path(output)
    write_json_atomic(path, {**manifest, "output": str(Path(output).resolve()), "output_sha256": file_sha256(output),
                             "requests": num_requests, "end_time": now(), "complete": True})
    return path


# ---------------------------------------------------------------- C4 CLI (c4_train, c4_val)

def c4_getdata_main(argv: Sequence[str] | None, *, split: str, default_output: Path, default_num_docs: int) -> Path:
    """The CLI of c4_train/getdata.py and c4_val/getdata.py; returns the path written."""
    parser = argparse.ArgumentParser(
        description=f"Write C4 `en` {split} documents as echo scoring requests (original DejaVu JSONL format), "
                    f"one request per document, plus <output>.manifest.json.")
    parser.add_argument("--output", type=Path, default=default_output,
                        help=f"request file to write (replaced if it exists); default: {default_output}")
    parser.add_argument("--num-docs", type=int, default=default_num_docs,
                        help=f"number of documents to write; 0 = all of the source; more than the source has "
                             f"is an error (default: {default_num_docs})")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED,
                        help=f"shuffle seed, for the hub stream and for --from-file (default: {DEFAULT_SEED})")
    parser.add_argument("--from-file", type=Path, default=None, metavar="PATH",
                        help="offline: read documents from a local .jsonl (a \"text\" key per line) or .parquet "
                             "(a \"text\" column) instead of the hub; rows are shuffled with random.Random(seed)")
    parser.add_argument("--shuffle-buffer", type=int, default=C4_SHUFFLE_BUFFER,
                        help=f"hub only: buffer size of the streaming shuffle, as the original "
                             f"(default: {C4_SHUFFLE_BUFFER})")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"value of the informational \"model\" field of each request (default: {DEFAULT_MODEL})")
    args = parser.parse_args(argv)

    manifest = base_manifest(kind="request_file", dataset=f"c4 en {split}", seed=args.seed,
                             num_docs=args.num_docs, model=args.model)
    try:
        if args.from_file is not None:
            all_texts = read_documents_file(args.from_file)
            rows = select_rows(len(all_texts), args.num_docs, args.seed)
            texts = [all_texts[r] for r in rows]
            manifest["source"] = {"kind": "file", "path": str(args.from_file.resolve()),
                                  "sha256": file_sha256(args.from_file), "documents_available": len(all_texts),
                                  "shuffle": "random.Random(seed).shuffle(list(range(documents_available)))",
                                  "selected_rows": rows}
            where = str(args.from_file)
        else:
            texts = hub_c4_documents(split, args.num_docs, args.seed, args.shuffle_buffer)
            manifest["source"] = {"kind": "hub", "dataset": C4_HUB_DATASET, "config": C4_HUB_CONFIG, "split": split,
                                  "streaming": True, "shuffle_buffer": args.shuffle_buffer}
            where = f"hub {C4_HUB_DATASET}/{C4_HUB_CONFIG} {split}"
        count = write_requests(args.output, (make_echo_request(t, args.model) for t in texts))
    except (OSError, ValueError) as e:
        parser.exit(1, f"{parser.prog}: error: {e}\n")
    mpath = write_request_manifest(args.output, manifest, count)
    print(f"wrote {count} requests (C4 en {split} from {where}, seed {args.seed}) to {args.output}; "
          f"manifest {mpath}")
    return args.output


# ---------------------------------------------------------------- WikiText-2 windows

@dataclass(frozen=True)
class TextWindow:
    """Tokens `token_ids` of the whole-text tokenization, whose text is `text[start:end]` (character offsets)."""
    start: int
    end: int
    token_ids: tuple[int, ...]

    @property
    def token_count(self) -> int:
        return len(self.token_ids)


def window_length(tokenizer: Any, max_seq_len: int) -> int:
    """Text tokens per window: max_seq_len minus the special tokens the tokenizer adds to one sequence (BOS)."""
    window_tokens = max_seq_len - tokenizer.num_special_tokens_to_add(pair=False)
    if window_tokens < 4:
        raise ValueError(f"--max-seq-len {max_seq_len} leaves {window_tokens} text tokens per window; need >= 4")
    return window_tokens


def token_windows(text: str, tokenizer: Any, window_tokens: int) -> list[TextWindow]:
    """Cut `text` into consecutive, non-overlapping windows of at most `window_tokens` tokens.

    `tokenizer` is a fast Hugging Face tokenizer; `text` is tokenized once without special
    tokens. Each window takes the next `window_tokens` tokens, except that a cut never splits
    the bytes of one character (a byte-level BPE can spread a multi-byte UTF-8 character such
    as "–" over several tokens that share its offsets): such a cut moves back to the
    character's first token, so that window is 1-3 tokens shorter and the next starts with the
    whole character. Without that, re-tokenizing the two spans changes their token counts
    (measured on WikiText-2 test, see wikitext2/getdata.py).

    A window's text starts where the offset mapping says its first token starts (window 0 at
    character 0) and ends where the next window starts (the last at len(text)), so the
    windows' texts concatenated are exactly `text`: characters that no token's offsets cover
    (a space that a tokenizer with trim_offsets=True leaves out) belong to the window before.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("token windows need a fast tokenizer (offset mapping); got a slow one")
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    ids, offsets = encoding["input_ids"], encoding["offset_mapping"]
    if not ids:
        raise ValueError("the text has no tokens")
    cuts = [0]  # token index where each window starts
    while cuts[-1] + window_tokens < len(ids):
        cut = cuts[-1] + window_tokens
        while offsets[cut][0] < offsets[cut - 1][1]:  # tokens cut-1 and cut share a character
            cut -= 1
        if cut <= cuts[-1]:
            raise ValueError(f"a single character at offset {offsets[cut][0]} spans more than {window_tokens} tokens")
        cuts.append(cut)
    starts = [0] + [offsets[c][0] for c in cuts[1:]]
    ends = starts[1:] + [len(text)]
    token_ends = cuts[1:] + [len(ids)]
    return [TextWindow(start, end, tuple(ids[a:b])) for start, end, a, b in zip(starts, ends, cuts, token_ends)]


def window_requests(text: str, windows: Sequence[TextWindow], model: str = DEFAULT_MODEL,
                    articles: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """One echo request per window: its exact text as the prompt, plus "window_token_count" and, when given, the
    window's "article" (window_articles), which perplexity intervals resample as a cluster."""
    return [{**make_echo_request(text[w.start:w.end], model), "window_token_count": w.token_count,
             **({"article": articles[i]} if articles is not None else {})} for i, w in enumerate(windows)]


# A WikiText article starts at its title line " = Title = "; section lines have more "=" (" = = Section = = ").
ARTICLE_TITLE = re.compile(r"(?m)^ = [^=].* = ?$")
ARTICLE_RULE = ("articles start at each title line ' = Title = ' (not ' = = Section = = '), text before the first "
                "title belongs to the first; a window belongs to the article holding its middle character")


def article_starts(text: str) -> list[int]:
    """Character offsets where each WikiText article starts (its title line); [0] when there is no title."""
    starts = [m.start() for m in ARTICLE_TITLE.finditer(text)]
    return starts or [0]


def window_articles(text: str, windows: Sequence[TextWindow]) -> list[int]:
    """The article index (0-based, in text order) of every window (ARTICLE_RULE): windows of one article are not
    independent draws, so intervals resample articles."""
    starts = article_starts(text)
    return [max(0, bisect.bisect_right(starts, (w.start + w.end - 1) // 2) - 1) for w in windows]


def retokenization_check(text: str, windows: Sequence[TextWindow], tokenizer: Any) -> dict[str, int]:
    """Re-tokenize every window's text as the runner will (special tokens excluded) and compare with the window.

    Counts windows whose re-tokenized ids differ from the window's ids, those whose length
    differs, those that got longer (their prompt would exceed --max-seq-len), and the summed
    length difference.
    """
    differing = length_differing = longer = delta = 0
    for w in windows:
        ids = tuple(tokenizer(text[w.start:w.end], add_special_tokens=False, verbose=False)["input_ids"])
        d = len(ids) - w.token_count
        differing += ids != w.token_ids
        length_differing += d != 0
        longer += d > 0
        delta += d
    return {"windows": len(windows), "windows_ids_differing": differing, "windows_length_differing": length_differing,
            "windows_longer": longer, "token_count_delta": delta, "tokens": sum(w.token_count for w in windows)}

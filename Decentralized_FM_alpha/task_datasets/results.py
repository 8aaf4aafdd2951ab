"""Results files (SPEC §4 output format) and the perplexity of echo requests.

Each line: {"request": {...}, "result": {"choices": [{"logprobs": {"token_logprobs": [...], ...}}]}}.
perplexity = exp(-mean of token_logprobs[1:] over all lines), the original DejaVu one-liner
(run_infer_opt_175b_c4.sh): the first token of each request has no log-prob (None) and is
excluded. Unlike that one-liner, a line that is not such an object is an error with its line
number, not the end of the file; only blank lines are skipped, as there.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from Decentralized_FM_alpha.utils.manifest import file_sha256


def _token_logprobs(item: Any, where: str) -> list[Any]:
    if not isinstance(item, dict) or "request" not in item or "result" not in item:
        raise ValueError(f"{where}: not an object with \"request\" and \"result\" keys")
    try:
        logprobs = item["result"]["choices"][0]["logprobs"]["token_logprobs"]
    except (KeyError, IndexError, TypeError) as e:
        raise ValueError(f"{where}: no result.choices[0].logprobs.token_logprobs ({e!r})") from e
    if not isinstance(logprobs, list):
        raise ValueError(f"{where}: token_logprobs is {type(logprobs).__name__}, not a list")
    return logprobs


def perplexity_of_results(path: str | os.PathLike) -> dict[str, Any]:
    """Perplexity of a results JSONL, with the counts it rests on.

    Returns {"perplexity", "mean_logprob", "tokens" (log-probs summed), "requests" (lines),
    "requests_with_window_token_count", "window_token_count_mismatches" (requests written by
    wikitext2/getdata.py whose number of log-probs after the first differs from their
    "window_token_count"), "results_file", "results_sha256", "per_request" (log-prob sum and
    scored tokens of every line, in file order: what bootstrap intervals resample; plus "articles", each line's
    request "article", when every request has one: intervals then resample articles)}.
    A log-prob after index 0 that is None or not a finite number is an error naming the line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing file: {path}")
    line_sums: list[float] = []  # sum of log-probs per line, summed exactly at the end
    line_tokens: list[int] = []
    articles: list = []  # the request's "article" (WikiText windows), the cluster an interval resamples
    tokens = windowed = mismatches = 0
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg})") from e
            scored = _token_logprobs(item, where)[1:]
            for i, lp in enumerate(scored, start=1):
                if isinstance(lp, bool) or not isinstance(lp, (int, float)) or not math.isfinite(lp):
                    raise ValueError(f"{where}: token_logprobs[{i}] is {lp!r}, not a finite number")
            line_sums.append(math.fsum(scored))
            line_tokens.append(len(scored))
            tokens += len(scored)
            request = item["request"]
            articles.append(request.get("article") if isinstance(request, dict) else None)
            if isinstance(request, dict) and "window_token_count" in request:
                if not isinstance(request["window_token_count"], int):
                    raise ValueError(f"{where}: request.window_token_count is {request['window_token_count']!r}, "
                                     f"not an integer")
                windowed += 1
                mismatches += len(scored) != request["window_token_count"]
    if tokens == 0:
        raise ValueError(f"{path}: no scored tokens (no lines, or only one token per request)")
    mean_logprob = math.fsum(line_sums) / tokens
    return {"perplexity": math.exp(-mean_logprob), "mean_logprob": mean_logprob, "tokens": tokens,
            "requests": len(line_sums), "requests_with_window_token_count": windowed,
            "window_token_count_mismatches": mismatches, "results_file": str(path.resolve()),
            "results_sha256": file_sha256(path),
            "per_request": {"logprob_sums": line_sums, "tokens": line_tokens,  # for bootstrap intervals
                            **({"articles": articles} if None not in articles else {})}}

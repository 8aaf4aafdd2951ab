"""Requests in, results out, in the original DejaVu / HELM JSONL format (SPEC section 4)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

REQUIRED_KEYS = ("prompt",)
DEFAULTS = {"max_tokens": 0, "echo": True, "logprobs": 1, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "n": 1,
            "best_of": 1, "stop": None}


class RequestFileError(ValueError):
    """A request file that cannot be read as a whole; the message names the file and line."""


@dataclass
class Request:
    index: int  # 0-based position in the file: the document id of collected rows
    raw: dict[str, Any]
    prompt: str
    max_tokens: int
    echo: bool
    logprobs: int
    temperature: float
    top_p: float
    top_k: int
    n: int
    stop: list[str] = field(default_factory=list)


def parse_request(raw: dict[str, Any], index: int, where: str) -> Request:
    if not isinstance(raw, dict):
        raise RequestFileError(f"{where}: a request must be a JSON object, found {type(raw).__name__}")
    if not isinstance(raw.get("prompt"), str):
        raise RequestFileError(f"{where}: missing or non-string \"prompt\"")
    v = {**DEFAULTS, **{k: raw[k] for k in DEFAULTS if k in raw and raw[k] is not None}}
    try:
        req = Request(index=index, raw=raw, prompt=raw["prompt"], max_tokens=int(v["max_tokens"]), echo=bool(v["echo"]),
                      logprobs=int(v["logprobs"] or 0), temperature=float(v["temperature"]), top_p=float(v["top_p"]),
                      top_k=int(v["top_k"]), n=int(v["n"]),
                      stop=[v["stop"]] if isinstance(v["stop"], str) else list(v["stop"] or []))
    except (TypeError, ValueError) as e:
        raise RequestFileError(f"{where}: bad field value ({e})") from e
    if req.max_tokens < 0 or req.n < 1 or req.logprobs < 0:
        raise RequestFileError(f"{where}: max_tokens and logprobs must be >= 0 and n >= 1")
    if req.max_tokens == 0 and not req.echo:
        raise RequestFileError(f"{where}: max_tokens 0 without echo asks for nothing")
    return req


def read_requests(path: str | Path) -> list[Request]:
    """All requests of a JSONL file; any malformed line is an error naming its line number."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"request file not found: {path}")
    try:
        lines = path.read_bytes().decode("utf-8").split("\n")  # not splitlines(): U+2028 may sit inside a JSON string
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise RequestFileError(f"{path}:{line}: not valid UTF-8 ({e.reason} at byte {e.start})") from e
    requests = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as e:
            raise RequestFileError(f"{path}:{number}: malformed JSON ({e.msg} at column {e.colno})") from e
        requests.append(parse_request(raw, len(requests), f"{path}:{number}"))
    if not requests:
        raise RequestFileError(f"{path}: no requests (the file is empty)")
    return requests


def choice_record(text: str, index: int, tokens: list[str], token_logprobs: list[Optional[float]],
                  top_logprobs: Optional[list[Optional[dict[str, float]]]], text_offset: list[int],
                  finish_reason: str) -> dict[str, Any]:
    return {"text": text, "index": index, "finish_reason": finish_reason,
            "logprobs": {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
                         "text_offset": text_offset}}


def result_record(request: Request, choices: list[dict[str, Any]]) -> dict[str, Any]:
    return {"request": request.raw, "result": {"choices": choices}}

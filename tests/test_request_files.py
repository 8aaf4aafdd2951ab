"""Request-file generators (C4, WikiText-2 windows) and the perplexity of results files."""
from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest

from Decentralized_FM_alpha.task_datasets.request_files import (
    c4_getdata_main, make_echo_request, read_documents_file, retokenization_check, select_rows, token_windows,
    window_length, window_requests, write_requests)
from Decentralized_FM_alpha.task_datasets.results import perplexity_of_results
from Decentralized_FM_alpha.utils.manifest import file_sha256
from Decentralized_FM_alpha.wikitext2 import getdata as wikitext2_getdata
from tests.helpers_tokenizer import build_test_tokenizer

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
C4_TRAIN = FIXTURES / "c4_train_sample.jsonl"
C4_VAL = FIXTURES / "c4_val_sample.jsonl"
WIKI_HEAD = FIXTURES / "wikitext2_test_head.txt"

ORIGINAL_REQUEST = {"best_of": 1, "echo": True, "logprobs": 1, "max_tokens": 0, "model": "opt-175b", "n": 1,
                    "request_type": "language-model-inference", "stop": None, "temperature": 0, "top_p": 1}


def jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def fixture_texts(path: Path) -> list[str]:
    return [d["text"] for d in jsonl(path)]


def run_c4(argv: list[str], split: str = "train", default_num_docs: int = 500) -> None:
    c4_getdata_main(argv, split=split, default_output=Path("unused.jsonl"), default_num_docs=default_num_docs)


def read_text(path: Path) -> str:
    with open(path, encoding="utf-8", newline="") as f:
        return f.read()


# ---------------------------------------------------------------- C4 request files

def test_request_has_exactly_the_original_keys_and_values():
    assert make_echo_request("some text") == {**ORIGINAL_REQUEST, "prompt": "some text"}
    assert make_echo_request("x", model="llama-3.2-3b")["model"] == "llama-3.2-3b"


def test_from_file_jsonl_selects_the_seeded_shuffle_and_is_reproducible(tmp_path):
    out_a, out_b, out_other = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    run_c4(["--from-file", str(C4_TRAIN), "--num-docs", "10", "--output", str(out_a)])
    run_c4(["--from-file", str(C4_TRAIN), "--num-docs", "10", "--output", str(out_b)])
    run_c4(["--from-file", str(C4_TRAIN), "--num-docs", "10", "--seed", "1", "--output", str(out_other)])
    assert out_a.read_bytes() == out_b.read_bytes()
    assert out_a.read_bytes() != out_other.read_bytes()

    rows = list(range(40))
    random.Random(42).shuffle(rows)
    texts = fixture_texts(C4_TRAIN)
    requests = jsonl(out_a)
    assert [r["prompt"] for r in requests] == [texts[i] for i in rows[:10]]
    assert all(r == {**ORIGINAL_REQUEST, "prompt": r["prompt"]} for r in requests)

    manifest = json.loads(Path(str(out_a) + ".manifest.json").read_text())
    assert manifest["source"]["selected_rows"] == rows[:10]
    assert manifest["source"]["sha256"] == file_sha256(C4_TRAIN)
    assert manifest["source"]["documents_available"] == 40
    assert manifest["output_sha256"] == file_sha256(out_a)
    assert manifest["requests"] == 10 and manifest["seed"] == 42 and manifest["complete"] is True
    assert {"command", "git_commit", "versions", "start_time", "end_time"} <= manifest.keys()


def test_from_file_parquet_reads_the_text_column_and_num_docs_0_means_all(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = jsonl(C4_VAL)
    parquet = tmp_path / "val.parquet"
    pq.write_table(pa.Table.from_pylist(docs), parquet)
    out = tmp_path / "c4_valid.jsonl"
    run_c4(["--from-file", str(parquet), "--num-docs", "0", "--output", str(out)], split="validation",
           default_num_docs=10000)
    prompts = [r["prompt"] for r in jsonl(out)]
    assert sorted(prompts) == sorted(d["text"] for d in docs)
    assert prompts != [d["text"] for d in docs]  # shuffled, as the hub stream is


def test_entry_script_runs_from_the_repo_root_and_prints_one_summary_line(tmp_path):
    out = tmp_path / "c4_train.jsonl"
    proc = subprocess.run([sys.executable, "Decentralized_FM_alpha/c4_train/getdata.py", "--from-file",
                           str(C4_TRAIN), "--num-docs", "5", "--output", str(out)],
                          cwd=REPO, capture_output=True, text=True, check=True)
    assert proc.stdout.splitlines() == [f"wrote 5 requests (C4 en train from {C4_TRAIN}, seed 42) to {out}; "
                                        f"manifest {out}.manifest.json"]
    assert len(jsonl(out)) == 5


def test_hub_path_streams_allenai_c4_en_shuffled_with_buffer_10000_and_the_seed(tmp_path, monkeypatch):
    import datasets

    docs = jsonl(C4_TRAIN)
    calls = []

    def fake_load_dataset(path, name=None, split=None, streaming=False):
        calls.append((path, name, split, streaming))
        return datasets.IterableDataset.from_generator(lambda: iter(docs))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    out = tmp_path / "c4_train.jsonl"
    run_c4(["--num-docs", "7", "--output", str(out)])
    assert calls == [("allenai/c4", "en", "train", True)]
    expected = datasets.IterableDataset.from_generator(lambda: iter(docs)).shuffle(buffer_size=10000, seed=42)
    assert [r["prompt"] for r in jsonl(out)] == [d["text"] for d in expected][:7]
    manifest = json.loads(Path(str(out) + ".manifest.json").read_text())
    assert manifest["source"] == {"kind": "hub", "dataset": "allenai/c4", "config": "en", "split": "train",
                                  "streaming": True, "shuffle_buffer": 10000}

    with pytest.raises(SystemExit):  # the stream has 40 documents
        run_c4(["--num-docs", "41", "--output", str(out)])


def test_line_separator_characters_stay_inside_one_jsonl_line(tmp_path):
    prompt = "a\u2028b\u2029c\x85d\ne"
    out = tmp_path / "r.jsonl"
    assert write_requests(out, [make_echo_request(prompt)]) == 1
    lines = out.read_text(encoding="utf-8").splitlines()  # splits on \u2028 etc. too
    assert len(lines) == 1 and json.loads(lines[0])["prompt"] == prompt


# ---------------------------------------------------------------- bad inputs

def test_num_docs_larger_than_the_file_is_an_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        run_c4(["--from-file", str(C4_TRAIN), "--num-docs", "41", "--output", str(tmp_path / "x.jsonl")])
    assert exc.value.code == 1
    assert "--num-docs 41 but the source has only 40 documents" in capsys.readouterr().err
    assert not (tmp_path / "x.jsonl").exists()
    with pytest.raises(ValueError, match="must be >= 0"):
        select_rows(40, -1, 42)


def test_missing_file_error_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope.jsonl")):
        read_documents_file(tmp_path / "nope.jsonl")


def test_jsonl_line_without_text_names_its_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "one"}\n{"txt": "two"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{bad}:2: no \"text\" key"):
        read_documents_file(bad)
    bad.write_text('{"text": "one"}\n{"text": "two"}\n{not json\n', encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{bad}:3: not valid JSON"):
        read_documents_file(bad)
    bad.write_text('{"text": 3}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{bad}:1: \"text\" is int"):
        read_documents_file(bad)


def test_parquet_without_text_column_or_other_suffix_is_an_error(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = tmp_path / "no_text.parquet"
    pq.write_table(pa.table({"content": ["a"]}), parquet)
    with pytest.raises(ValueError, match="no \"text\" column"):
        read_documents_file(parquet)
    other = tmp_path / "docs.csv"
    other.write_text("text\na\n")
    with pytest.raises(ValueError, match="unsupported file type '.csv'"):
        read_documents_file(other)


# ---------------------------------------------------------------- tiny tokenizer fixture

def test_tiny_tokenizer_is_deterministic_and_adds_an_opt_style_bos(tmp_path, tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    again = build_test_tokenizer(tmp_path / "again")
    assert (again / "tokenizer.json").read_bytes() == (tiny_tokenizer_dir / "tokenizer.json").read_bytes()
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    assert tok.is_fast and tok.bos_token == "</s>" and tok.bos_token_id == 2 and tok.pad_token_id == 1
    enc = tok("Hello world", return_offsets_mapping=True)
    assert enc["input_ids"] == [2, *tok("Hello world", add_special_tokens=False)["input_ids"]]
    assert tok.num_special_tokens_to_add(pair=False) == 1
    # offsets are not trimmed: the token holding " world" starts at the space
    assert any(start == 5 for start, _ in enc["offset_mapping"][1:])


# ---------------------------------------------------------------- WikiText-2 windows

@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def test_window_length_is_max_seq_len_minus_the_bos(tiny_tokenizer):
    assert window_length(tiny_tokenizer, 2048) == 2047
    with pytest.raises(ValueError, match="need >= 4"):
        window_length(tiny_tokenizer, 4)


@pytest.mark.parametrize("window_tokens", [7, 63, 511])
def test_windows_cover_the_text_exactly_without_overlap_or_gap(tiny_tokenizer, window_tokens):
    text = read_text(WIKI_HEAD)
    windows = token_windows(text, tiny_tokenizer, window_tokens)
    assert "".join(text[w.start:w.end] for w in windows) == text
    assert all(a.end == b.start for a, b in zip(windows, windows[1:]))
    assert windows[0].start == 0 and windows[-1].end == len(text)
    all_ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert [i for w in windows for i in w.token_ids] == all_ids
    assert all(1 <= w.token_count <= window_tokens for w in windows)
    # only a cut inside a multi-byte character makes a window shorter (by at most 3 tokens)
    assert all(w.token_count >= window_tokens - 3 for w in windows[:-1])
    assert retokenization_check(text, windows, tiny_tokenizer) == {
        "windows": len(windows), "windows_ids_differing": 0, "windows_length_differing": 0, "windows_longer": 0,
        "token_count_delta": 0, "tokens": len(all_ids)}


def test_a_cut_never_splits_a_multibyte_character(tiny_tokenizer):
    text = "x \u6f22\u5b57 y " * 60  # CJK characters: 3 UTF-8 bytes, unknown to the tiny vocabulary
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text.replace(" ", ""))  # the characters take several byte tokens each
    shortened = 0
    for window_tokens in range(4, 12):
        windows = token_windows(text, tiny_tokenizer, window_tokens)
        shortened += sum(w.token_count < window_tokens for w in windows[:-1])
        assert "".join(text[w.start:w.end] for w in windows) == text
        assert retokenization_check(text, windows, tiny_tokenizer)["windows_ids_differing"] == 0
    assert shortened > 0


def test_window_requests_rescore_as_bos_plus_the_window_in_the_runner(tiny_tokenizer):
    text = read_text(WIKI_HEAD)
    windows = token_windows(text, tiny_tokenizer, window_length(tiny_tokenizer, 128))
    requests = window_requests(text, windows)
    for request, window in zip(requests, windows):
        assert request == {**ORIGINAL_REQUEST, "prompt": text[window.start:window.end],
                           "window_token_count": window.token_count}
        runner_ids = tiny_tokenizer(request["prompt"])["input_ids"]  # the runner adds the BOS
        assert runner_ids == [tiny_tokenizer.bos_token_id, *window.token_ids]
        assert len(runner_ids) <= 128


def test_wikitext2_cli_writes_requests_and_a_manifest_with_the_retokenization_check(tmp_path, tiny_tokenizer_dir,
                                                                                    capsys):
    out = tmp_path / "wt.jsonl"
    wikitext2_getdata.main(["--input-file", str(WIKI_HEAD), "--tokenizer", str(tiny_tokenizer_dir),
                            "--max-seq-len", "256", "--output", str(out)])
    requests = jsonl(out)
    assert "".join(r["prompt"] for r in requests) == read_text(WIKI_HEAD)
    manifest = json.loads(Path(str(out) + ".manifest.json").read_text())
    assert manifest["window_tokens"] == 255 and manifest["requests"] == len(requests)
    assert manifest["source"] == {"kind": "file", "path": str(WIKI_HEAD), "sha256": file_sha256(WIKI_HEAD)}
    assert manifest["retokenization"]["windows_ids_differing"] == 0
    assert manifest["retokenization"]["tokens"] == sum(r["window_token_count"] for r in requests)
    assert manifest["articles"]["count"] == len({r["article"] for r in requests}) >= 1
    assert [r["article"] for r in requests] == sorted(r["article"] for r in requests)  # windows in text order
    assert manifest["tokenizer"]["tokenizer_json_sha256"] == file_sha256(tiny_tokenizer_dir / "tokenizer.json")
    assert capsys.readouterr().out.startswith(f"wrote {len(requests)} requests (")


def test_wikitext2_cli_missing_input_or_tokenizer_names_the_path(tmp_path, tiny_tokenizer_dir, capsys):
    with pytest.raises(SystemExit):
        wikitext2_getdata.main(["--input-file", str(tmp_path / "none.txt"), "--tokenizer", str(tiny_tokenizer_dir)])
    assert f"missing file: {tmp_path / 'none.txt'}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        wikitext2_getdata.main(["--input-file", str(WIKI_HEAD), "--tokenizer", str(tmp_path)])
    assert f"missing file: {tmp_path / 'tokenizer.json'}" in capsys.readouterr().err


# ---------------------------------------------------------------- perplexity of results

def result_line(token_logprobs: list, **request_extra) -> str:
    return json.dumps({"request": {**ORIGINAL_REQUEST, "prompt": "p", **request_extra},
                       "result": {"choices": [{"text": "p", "index": 0, "finish_reason": "length",
                                               "logprobs": {"tokens": [], "token_logprobs": token_logprobs,
                                                            "top_logprobs": None, "text_offset": []}}]}}) + "\n"


def test_perplexity_is_exp_of_minus_the_mean_logprob_after_the_first_token(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text(result_line([None, -1.0, -2.0], window_token_count=2) + "\n"
                    + result_line([None, -0.5], window_token_count=2) + result_line([None]))
    result = perplexity_of_results(path)
    assert result["tokens"] == 3 and result["requests"] == 3
    assert result["mean_logprob"] == pytest.approx(-3.5 / 3, abs=1e-15)
    assert result["perplexity"] == pytest.approx(math.exp(3.5 / 3), rel=1e-15)
    assert result["requests_with_window_token_count"] == 2 and result["window_token_count_mismatches"] == 1
    assert result["results_sha256"] == file_sha256(path)


def test_perplexity_cli_prints_json_and_writes_output_with_manifest(tmp_path):
    path, out = tmp_path / "results.jsonl", tmp_path / "ppl.json"
    path.write_text(result_line([None, -1.0, -3.0]))
    proc = subprocess.run([sys.executable, "scripts/analysis/perplexity.py", str(path), "--json", "--output", str(out)],
                          cwd=REPO, capture_output=True, text=True, check=True)
    printed = json.loads(proc.stdout)
    assert printed["perplexity"] == pytest.approx(math.exp(2.0)) and printed["tokens"] == 2
    assert json.loads(out.read_text()) == printed
    assert json.loads(Path(str(out) + ".manifest.json").read_text())["results_sha256"] == file_sha256(path)


@pytest.mark.parametrize("lines, message", [
    ([[None, -1.0], [None, -1.0, None]], r":2: token_logprobs\[2\] is None"),
    ([[None, -1.0], [None, float("nan")]], r":2: token_logprobs\[1\] is nan"),
])
def test_perplexity_rejects_a_missing_logprob_with_its_line(tmp_path, lines, message):
    path = tmp_path / "results.jsonl"
    path.write_text("".join(result_line(lp) for lp in lines))
    with pytest.raises(ValueError, match=message):
        perplexity_of_results(path)


def test_perplexity_rejects_malformed_lines_with_their_number(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text(result_line([None, -1.0]) + '{"request": {}}\n')
    with pytest.raises(ValueError, match=rf"{path}:2: not an object with \"request\" and \"result\""):
        perplexity_of_results(path)
    path.write_text(result_line([None, -1.0]) + "{oops\n")
    with pytest.raises(ValueError, match=rf"{path}:2: not valid JSON"):
        perplexity_of_results(path)
    path.write_text('{"request": {}, "result": {"choices": []}}\n')
    with pytest.raises(ValueError, match=rf"{path}:1: no result.choices\[0\]"):
        perplexity_of_results(path)
    path.write_text(result_line([None]))
    with pytest.raises(ValueError, match="no scored tokens"):
        perplexity_of_results(path)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "none.jsonl")):
        perplexity_of_results(tmp_path / "none.jsonl")


def test_manifest_names_the_commit_of_a_tree_exported_by_git_archive(tmp_path):
    """A copy without .git (a GPU node gets `git archive HEAD`) still records the commit it came from."""
    repo = Path(__file__).resolve().parents[1]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True).stdout
    archive = subprocess.run(["git", "archive", "HEAD", "Decentralized_FM_alpha"], cwd=repo, capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tmp_path)], input=archive, check=True)
    code = "from Decentralized_FM_alpha.utils.manifest import git_commit; print(git_commit())"
    printed = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True,
                             env={"PATH": "/usr/bin:/bin", "GIT_DIR": "/nonexistent"}).stdout.strip()
    assert printed == f"{head.strip()} (git archive export)"

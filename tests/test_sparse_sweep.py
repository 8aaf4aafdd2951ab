"""The sweep script and the sparse run script, as a user runs them, on a tiny OPT."""
from __future__ import annotations

import csv
import json
import os
import subprocess

from scripts.study import sparse_sweep
from tests.helpers_models import make_opt
from tests.runner_helpers import REPO, c4_texts, read_results, run_one_rank, token_logprobs, write_requests
from tests.test_sparse_inference import write_predictors


def test_sweep_table_has_dense_baseline_and_every_setting(tmp_path, tiny_tokenizer_dir):
    model, _, converted = make_opt(tmp_path, tiny_tokenizer_dir, seed=21)
    c4 = write_requests(tmp_path / "c4.jsonl", c4_texts(2, max_chars=200))
    wiki = write_requests(tmp_path / "wiki.jsonl", c4_texts(3, max_chars=120)[1:])
    write_predictors(tmp_path / "pred", model, "opt", seed=2)
    out = tmp_path / "sweep"
    argv = ["--model-name", str(converted), "--family", "opt", "--data", f"c4={c4}", "--data", f"wikitext2={wiki}",
            "--modes", "oracle", "predictor", "random", "--mlp-topk", "0.25", "0.5", "--att-topk", "2", "3",
            "--predictor-dir", str(tmp_path / "pred"), "--out-dir", str(out)]
    rows = sparse_sweep.main(argv)
    assert len(rows) == 2 * (1 + 3 * 2)
    with open(out / "sweep.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["mode"] for r in table[:7]] == ["dense"] + ["oracle"] * 2 + ["predictor"] * 2 + ["random"] * 2
    assert {(r["mlp_topk"], r["att_topk"]) for r in table if r["mode"] == "oracle"} == {("0.25", "2"), ("0.5", "3")}
    dense_c4 = json.loads(open(table[0]["output_manifest"]).read())["perplexity"]["perplexity"]
    run_one_rank(["--model-name", str(converted), "--model-type", "opt", "--infer-data", str(c4),
                  "--output-path", str(tmp_path / "dense.jsonl")])
    assert float(table[0]["perplexity"]) == dense_c4
    assert token_logprobs(read_results(tmp_path / "dense.jsonl")[0]) == \
        token_logprobs(read_results(out / "c4_dense.jsonl")[0])
    assert all(float(r["perplexity"]) > 1 for r in table)
    markdown = (out / "sweep.md").read_text()
    assert "| c4 | dense | dense | dense |" in markdown and "| wikitext2 | random | 0.5 | 3 |" in markdown
    # a second call resumes: nothing is recomputed, the table is the same
    stamp = (out / "c4_oracle_mlp0.25_att2.jsonl").stat().st_mtime_ns
    assert sparse_sweep.main(argv) == rows
    assert (out / "c4_oracle_mlp0.25_att2.jsonl").stat().st_mtime_ns == stamp


def test_sparse_run_script_with_the_original_environment_variables(tmp_path, tiny_tokenizer_dir):
    model, _, converted = make_opt(tmp_path, tiny_tokenizer_dir, seed=22)
    requests = write_requests(tmp_path / "c4.jsonl", c4_texts(2, max_chars=200))
    write_predictors(tmp_path / "pred", model, "opt", seed=3)
    env = {**os.environ, "PYTHONPATH": str(REPO), "MODEL_PATH": str(converted), "INFER_DATA": str(requests),
           "OUTPUT_PATH": str(tmp_path / "out.jsonl"), "DTYPE": "fp32", "CUDA_VISIBLE_DEVICES": "",
           "SPRARSE_PATH": str(tmp_path / "pred"), "TOPK": "24", "LAYER": "2", "SPARSE_ATT": "1", "ATTN_TOPK_1": "2"}
    done = subprocess.run(["bash", str(REPO / "Decentralized_FM_alpha/run_infer_opt_125m_c4_sparse.sh")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "perplexity" in done.stdout
    sparsity = json.loads((tmp_path / "out.jsonl.manifest.json").read_text())["sparsity"]
    assert sparsity["mlp_budgets"] == {"0": 24, "1": 24}  # LAYER=2: MLP sparse in layers 0 and 1
    assert sparsity["att_budgets"] == {"0": 2, "1": 2, "2": 2}
    assert {p["path"] for p in sparsity["predictors"]} == {str(tmp_path / "pred" / f"{b}_layer{l}.pt")
                                                           for b, ls in (("mlp", (0, 1)), ("att", (0, 1, 2))) for l in ls}

"""The sweep script and the sparse run script, as a user runs them, on a tiny OPT."""
from __future__ import annotations

import csv
import json
import os
import subprocess

import pytest

from scripts.study import sparse_sweep
from tests.helpers_models import make_opt
from tests.runner_helpers import REPO, c4_texts, read_results, run_one_rank, token_logprobs, write_requests
from tests.test_deployed_sparsity import label_predictors
from tests.test_sparse_inference import write_predictors


def test_sweep_decomposes_by_block_with_per_budget_predictors(tmp_path, tiny_tokenizer_dir):
    model, _, converted = make_opt(tmp_path, tiny_tokenizer_dir, seed=21)
    c4 = write_requests(tmp_path / "c4.jsonl", c4_texts(2, max_chars=200))
    wiki = write_requests(tmp_path / "wiki.jsonl", c4_texts(3, max_chars=120)[1:])
    for k, heads in (("0.25", 1), ("0.5", 2)):  # 4 heads: the count rule keeps 1 and 2
        label_predictors(tmp_path / f"pred/b{k}", model, "opt", k_mlp=float(k), att_heads=heads)
    out = tmp_path / "sweep"
    argv = ["--model-name", str(converted), "--family", "opt", "--data", f"c4={c4}", "--data", f"wikitext2={wiki}",
            "--modes", "oracle", "predictor", "random", "--mlp-topk", "0.25", "0.5", "--att-topk", "0.25", "0.5",
            "--predictor-dir", str(tmp_path / "pred/b{k}"), "--out-dir", str(out)]
    rows = sparse_sweep.main(argv)
    assert len(rows) == 2 * (1 + 3 * 3 * 2)
    with open(out / "sweep.csv") as f:
        table = list(csv.DictReader(f))
    assert [(r["mode"], r["block"]) for r in table[:7]] == [("dense", "none")] + [("oracle", b) for b in
                                                                                ("mlp", "mlp", "att", "att", "both", "both")]
    for mode in ("oracle", "predictor", "random"):
        rows_of_mode = {(r["block"], r["mlp_topk"], r["att_topk"]) for r in table if r["mode"] == mode}
        assert rows_of_mode == {("mlp", "0.25", "dense"), ("mlp", "0.5", "dense"), ("att", "dense", "0.25"),
                                ("att", "dense", "0.5"), ("both", "0.25", "0.25"), ("both", "0.5", "0.5")}
    for r in table:
        if r["mode"] == "predictor":  # each row ran the predictors trained for its budget, from the lookahead input
            assert r["predictor_input"] == "lookahead"
            assert r["mlp_trained_k"] == (r["mlp_topk"] if r["mlp_topk"] != "dense" else "n/a")
            assert r["att_kept"] == {"0.25": "1", "0.5": "2", "dense": "n/a"}[r["att_topk"]]
        if r["mode"] != "dense":
            assert r["dense_layers"] == "0"
        for block in ("mlp", "att"):  # on-policy Recall@K of each sparse block, per sparse layer (1 and 2) and mean
            recall, layers = r[f"{block}_on_policy_recall"], r[f"{block}_on_policy_recall_layers"]
            if r[f"{block}_topk"] == "dense":
                assert recall == layers == "n/a"
            elif r["mode"] == "oracle":  # the mask is the true top-K: 1 by construction
                assert (float(recall), layers) == (1.0, "1:1.0000 2:1.0000")
            else:
                assert [l.split(":")[0] for l in layers.split()] == ["1", "2"] and 0 < float(recall) <= 1
    dense_c4 = json.loads(open(table[0]["output_manifest"]).read())["perplexity"]["perplexity"]
    run_one_rank(["--model-name", str(converted), "--model-type", "opt", "--infer-data", str(c4),
                  "--output-path", str(tmp_path / "dense.jsonl")])
    assert float(table[0]["perplexity"]) == dense_c4
    assert token_logprobs(read_results(tmp_path / "dense.jsonl")[0]) == \
        token_logprobs(read_results(out / "c4_dense.jsonl")[0])
    # a setting run on the sweep's shared model equals the same setting run alone
    run_one_rank(["--model-name", str(converted), "--model-type", "opt-ml-att-sparse", "--infer-data", str(c4),
                  "--output-path", str(tmp_path / "alone.jsonl"), "--sparse-mode", "random", "--mlp-topk", "0.5",
                  "--att-topk", "0.5"])
    assert [token_logprobs(r) for r in read_results(tmp_path / "alone.jsonl")] == \
        [token_logprobs(r) for r in read_results(out / "c4_random_mlp0.5_att0.5.jsonl")]
    assert all(float(r["perplexity"]) > 1 for r in table)
    markdown = (out / "sweep.md").read_text()
    assert "| c4 | dense | none | dense | dense |" in markdown and "| wikitext2 | random | both | 0.5 | 0.5 |" in markdown
    # a second call resumes: nothing is recomputed, the table is the same
    stamp = (out / "c4_oracle_mlp0.25_att0.25.jsonl").stat().st_mtime_ns
    assert sparse_sweep.main(argv) == rows
    assert (out / "c4_oracle_mlp0.25_att0.25.jsonl").stat().st_mtime_ns == stamp


def test_a_paired_row_of_unequal_budgets_cannot_read_one_budget_folder():
    setting = sparse_sweep.Setting("predictor", "both", "0.25", "0.5")
    with pytest.raises(SystemExit, match="would read two folders"):
        sparse_sweep.predictor_dir("p/b{k}", setting)
    assert sparse_sweep.predictor_dir("p/b{k}", sparse_sweep.Setting("predictor", "both", "0.50", "0.5")) == "p/b0.5"


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
    # LAYER=2: MLP sparse below layer 2; layer 0 is dense in every mode by default (--dense-layers 0)
    assert sparsity["mlp_budgets"] == {"1": 24} and sparsity["dense_layers"] == [0]
    assert sparsity["att_budgets"] == {"1": 2, "2": 2}
    assert {p["path"] for p in sparsity["predictors"]} == {str(tmp_path / "pred" / f"{b}_layer{l}.pt")
                                                           for b, ls in (("mlp", (1,)), ("att", (1, 2))) for l in ls}

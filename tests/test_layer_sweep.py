"""One layer sparse at a time (scripts/study/layer_sweep.py), on the bundled trained tiny Llama: the layers before
the sparse one compute exactly the dense model, and the sweep writes one row per (block, mode, layer) and a summary
whose compounding rests on the sum of those rows."""
from __future__ import annotations

import csv
import json
import math
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoConfig, AutoTokenizer

from Decentralized_FM_alpha import convert_llama_checkpoint, dist_inference_runner
from scripts.report.inputs import discover
from scripts.report.why import layer_sweep_lines
from scripts.study import layer_sweep
from scripts.study.sparse_sweep import Setting, setting_argv
from tests.runner_helpers import REPO, c4_texts, write_requests
from tests.test_deployed_sparsity import write_static
from tests.test_sparse_inference import write_predictors

TINY_LLAMA = REPO / "pretrained_models/tiny-llama"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The converted tiny Llama (6 layers), two C4 requests and per-budget files: random predictors and static
    rankings for budget 0.5 in pred/b0.5."""
    tmp = tmp_path_factory.mktemp("layer_sweep")
    converted = tmp / "converted"
    convert_llama_checkpoint.main(["--model-name", str(TINY_LLAMA), "--save-path", str(converted)])
    model = SimpleNamespace(config=AutoConfig.from_pretrained(TINY_LLAMA))  # what the file writers read
    write_predictors(tmp / "pred/b0.5", model, "llama", seed=5)
    write_static(tmp / "pred/b0.5", model, "llama", k=0.5, seed=6)
    requests = write_requests(tmp / "c4.jsonl", c4_texts(2, max_chars=160))
    return converted, requests, tmp


def sweep_argv(tiny, *flags) -> list[str]:
    converted, requests, tmp = tiny
    return ["--model-name", str(converted), "--family", "llama", "--data", f"c4={requests}", "--predictor-dir",
            str(tmp / "pred/b{k}"), "--out-dir", str(tmp / "sweep"), *flags]


def block_outputs(argv: list[str], ids: torch.Tensor) -> list[torch.Tensor]:
    """Every block's output hidden states for one forward of the runner's model built from `argv`."""
    pipe = dist_inference_runner.build_pipeline(dist_inference_runner.resolve_args(argv))
    seen = []
    hooks = [b.register_forward_hook(lambda m, i, o: seen.append(o[0].clone())) for b in pipe.blocks]
    pipe.forward(ids, torch.ones_like(ids, dtype=torch.bool))
    for hook in hooks:
        hook.remove()
    pipe.comm.close()
    return seen


@pytest.mark.parametrize("block", ["mlp", "att"])
def test_only_layer_l_sparse_leaves_the_layers_before_it_dense(tiny, block):
    converted, requests, tmp = tiny
    args = layer_sweep.parse_args(sweep_argv(tiny))
    ids = torch.tensor([AutoTokenizer.from_pretrained(converted)(c4_texts(1, max_chars=200)[0])["input_ids"]])
    run = ["--infer-data", str(requests), "--output-path", str(tmp / "unused.jsonl")]
    dense = block_outputs(setting_argv(args, Setting("dense", "none")) + run, ids)
    layer = 3
    one_layer = Setting("predictor", block, **{block: "0.5"}, layers=str(layer))
    sparse = block_outputs(setting_argv(args, one_layer) + run, ids)
    assert all(torch.equal(d, s) for d, s in zip(dense[:layer], sparse[:layer]))
    assert (dense[layer] - sparse[layer]).abs().max() > 1e-4


def test_layer_sweep_rows_summary_and_resume(tiny):
    argv = sweep_argv(tiny)
    rows, summary = layer_sweep.main(argv)
    layers = [1, 2, 3, 4, 5]  # layer 0 stays dense (--dense-layers 0)
    pairs = [("mlp", m) for m in ("predictor", "oracle", "gate", "static")] + \
            [("att", m) for m in ("predictor", "oracle", "static")]  # gate ranks MLP neurons only
    assert [(r["block"], r["mode"], r["layer"]) for r in rows] == [(b, m, l) for b, m in pairs for l in layers]
    out = tiny[2] / "sweep"
    with open(out / "layer_sweep.csv") as f:
        table = list(csv.DictReader(f))
    assert [(r["block"], r["mode"], int(r["layer"])) for r in table] == [(b, m, l) for b, m in pairs for l in layers]
    for r in rows:
        assert r["log_increase"] == pytest.approx(math.log(r["perplexity"] / r["dense_perplexity"]), abs=1e-9)
        assert r["ratio_low"] <= r["ratio"] <= r["ratio_high"]
        manifest = json.loads(open(r["output_manifest"]).read())["sparsity"]
        assert manifest[f"{r['block']}_budgets"] == {str(r["layer"]): 0.5}  # only layer l sparse
        if r["mode"] == "oracle":  # the applied mask is the true top-K
            assert r["on_policy_recall"] == r["all_layers_on_policy_recall"] == 1.0
        else:
            assert 0 < r["on_policy_recall"] <= 1 and 0 < r["all_layers_on_policy_recall"] <= 1
    assert [(s["block"], s["mode"], s["layers"]) for s in summary] == [(b, m, len(layers)) for b, m in pairs]
    for s in summary:
        chosen = [r["log_increase"] for r in rows if (r["block"], r["mode"]) == (s["block"], s["mode"])]
        assert s["sum_single_log_increase"] == pytest.approx(sum(chosen), rel=1e-9)
        assert s["compounding"] == pytest.approx(s["all_layers_log_increase"] / s["sum_single_log_increase"], rel=1e-9)
        assert s["all_layers_log_increase"] == pytest.approx(
            math.log(s["all_layers_perplexity"] / rows[0]["dense_perplexity"]), abs=1e-9)
    assert (out / "layer_sweep.png").stat().st_size > 0
    assert "| c4 | att | static | 5 |" in (out / "layer_sweep.md").read_text()
    assert json.loads((out / "layer_sweep.manifest.json").read_text())["summary"] == summary
    found = discover([out])
    assert found.sweeps == [] and len(found.layer_sweeps) == 1  # single-layer rows: the report's where input
    [where] = layer_sweep_lines(found.layer_sweeps[0:1])[:1]
    mlp = next(s for s in summary if (s["block"], s["mode"]) == ("mlp", "predictor"))
    costliest = max((r for r in rows if (r["block"], r["mode"]) == ("mlp", "predictor")),
                    key=lambda r: r["log_increase"])
    assert where.startswith(f"{rows[0]['model']}, mlp at 0.5, predictor: the costliest single sparse layers are "
                            f"{costliest['layer']} ({costliest['log_increase']:.3f})")
    assert f"their sum over 5 layers {mlp['sum_single_log_increase']:.3f}" in where
    stamp = (out / "c4_oracle_mlp0.5_layers3.jsonl").stat().st_mtime_ns  # a second call resumes: nothing is rerun
    assert layer_sweep.main(argv) == (rows, summary)
    assert (out / "c4_oracle_mlp0.5_layers3.jsonl").stat().st_mtime_ns == stamp

"""The main job (scripts/run_demo.sh) end to end on the bundled tiny trio, reduced in size for CI."""
from __future__ import annotations

import csv
import json
import os
import re
import subprocess

from scripts.report.report import read_report
from tests.runner_helpers import REPO

REDUCED = {"TRAIN_DOCS": "12", "COLLECT_ROWS": "2500", "EPOCHS": "1", "RANK": "32", "VAL_DOCS": "3", "WIKI_WINDOWS": "2",
           "MAX_SEQ_LEN": "128", "MLP_BUDGETS": "0.25", "FRACTIONS": "0.25", "SEEDS": "1",
           "SWEEP_LABELS": "topk:0.25", "TASKS": "dejavu_copa", "TASK_LIMIT": "8", "TASK_JOBS": "2",
           "BOOTSTRAP_ITERS": "100", "CUDA_VISIBLE_DEVICES": "", "FOLDS": "2", "CAPACITY_LAYERS": "5",
           "CAPACITY_WIDTHS": "8,32", "CAPACITY_ROWS": "0.5,1"}
# Two of the trio keep CI short (each model adds about 85 s on 2 cores): both families; Llama-ReLU is the Llama path.
MODELS = ("tiny-opt", "tiny-llama")


def test_reduced_demo_writes_the_report_for_opt_and_llama(tmp_path):
    env = {**os.environ, **REDUCED, "MODELS": " ".join(MODELS), "OUT": str(tmp_path / "demo")}
    done = subprocess.run(["bash", str(REPO / "scripts/run_demo.sh")], env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-4000:])
    report_path = tmp_path / "demo" / "report" / "report.md"
    assert f"report at {report_path}" in done.stdout
    first = report_path.read_text()
    screen = first.split("\n## ")[0].splitlines()
    assert len(screen) <= 40 and any(line.startswith("| model | block: kept") for line in screen)  # the answer first
    assert "not a claim about Llama 3.2 3B" in first
    for model in MODELS:  # every model's table rows and sentence on the first screen
        assert any(line.startswith(f"| {model} | MLP: ") for line in screen)
        assert any(line.startswith(f"- {model}. MLP: the predictor needs ") for line in screen)
    assert "](figures/F3_perplexity_tiny-llama.png)" in first and "](figures/F2_recall_by_layer.png)" in first
    gallery = (report_path.parent / "figures" / "README.md").read_text()
    assert "F1_contextual_sparsity.png" in gallery and (report_path.parent / "figures" / "F1_contextual_sparsity.pdf").is_file()
    assert len(first.splitlines()) <= 400
    report = read_report(report_path)
    sections = {part.split("\n", 1)[0]: part for part in report.split("\n## ")[1:]}
    assert "Answer" in sections and "Summary and decomposition" in sections
    widths = [len(re.split(r"(?<!\\)\|", line.strip())) - 2 for line in report.splitlines() if line.startswith("|")]
    assert max(widths) <= 10  # markdown tables within the column limit
    for section in ("## Decomposition", "## Baselines and controls", "## Study stages", "## Collections", "## Residual-stream drift",
                    "## Perplexity", "## Downstream tasks"):
        assert section in report, section
    headings = {line.split(":")[0].strip("*"): line for line in report.splitlines()
                if "perplexity as a ratio to the model's dense perplexity" in line}
    assert "bootstrap over articles (WikiText-2)" in headings["wikitext2"]  # what its intervals resample
    assert "bootstrap over requests" in headings["c4"]
    for model in MODELS:  # what produced the rows, read from the sweep's own columns
        assert (f"{model}: predictor input lookahead, top-K label trained at each row's budget; layers kept dense in "
                f"every sparse mode: 0") in headings["c4"]
    stages = json.loads((tmp_path / "demo" / "study_manifest.json").read_text())["stages"]
    assert {(s["model"], s["stage"]) for s in stages} >= {(m, "collect") for m in MODELS}
    assert all(s["seconds"] > 0 for s in stages)
    assert {(s["model"], s["stage"]) for s in stages} >= {(m, "tasks (shards)") for m in MODELS}  # TASK_JOBS 2
    for model in MODELS:
        assert f"| {model} |" in report
        with open(tmp_path / "demo" / "sweep" / model / "sweep.csv") as f:
            rows = list(csv.DictReader(f))
        modes = ["oracle", "predictor", "random", "static"] + (["gate"] if model != "tiny-opt" else [])
        for dataset in ("c4", "wikitext2"):  # MLP-only, attention-only and paired rows for every mode
            found = {(r["mode"], r["block"]) for r in rows if r["dataset"] == dataset}
            assert found >= {("dense", "none")} | {(m, b) for m in modes for b in ("mlp", "att", "both")
                                                   if m != "gate" or b == "mlp"}, (dataset, found)
        assert all(float(r["perplexity"]) > 1 and int(r["tokens"]) > 0 for r in rows)
        assert all(r["dense_layers"] == "0" for r in rows if r["mode"] != "dense")
        for r in (r for r in rows if r["mode"] == "predictor"):  # predictors trained at the row's budget, lookahead
            assert r["predictor_input"] == "lookahead"
            for block in ("mlp", "att"):
                assert r[f"{block}_trained_k"] == (r[f"{block}_topk"] if r[f"{block}_topk"] != "dense" else "n/a")
        predictors = tmp_path / "demo" / "predictors" / model / "b0.25"
        for block in ("mlp", "att"):
            record = json.loads((predictors / f"{block}_layer5.json").read_text())
            assert record["input"] == "lookahead" and record["k"] == 0.25
            assert (predictors / f"static_{block}_layer5.json").is_file()
        with open(tmp_path / "demo" / "tasks" / model / "tasks.csv") as f:
            tasks = list(csv.DictReader(f))
        assert [(r["task"], r["mode"], r["block"], r["samples"]) for r in tasks] == [
            ("dejavu_copa", m, b, "8") for m, b in [("dense", "none")] + [(m, "both") for m in
                                                                         ("oracle", "predictor", "random", "static")]]

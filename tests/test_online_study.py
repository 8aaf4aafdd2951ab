"""run_study.py --collection online equals --collection mmap on tiny OPT and tiny Llama: a memory budget of two
layer groups (plan.layer_groups, as --plan prints; and, for tiny Llama, one group holding every layer), every record of the summary (predictors, baselines, the capacity
curves of the last layer, in the second group, and the folds of layer 1, in the first), every predictor and static
ranking JSON and summary row, the sparsity statistics, the label sweep, drift and the perplexity sweep, with paths,
times and provenance left out. A rerun skips every group; a group the online dir cannot hold is refused; --collection
auto takes the online path exactly when the mmap path does not fit the free disk."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from scripts import run_study
from scripts.study import plan
from tests.runner_helpers import REPO

SMALL = ["--device", "cpu", "--train-docs", "3", "--val-docs", "2", "--wiki-windows", "1", "--max-seq-len", "64",
         "--collect-tokens", "150", "--epochs", "1", "--D", "8", "--mlp-budgets", "0.5", "--fractions", "0.25",
         "--distance-fraction", "0.25", "--capacity-layers", "last", "--capacity-widths", "4", "--capacity-rows", "0.5",
         "--folds", "2", "--fold-layers", "1", "--tasks", "", "--modes", "predictor", "static", "--blocks", "both",
         "--drift-rows", "100", "--jobs", "1", "--stages", "requests,convert,collect,predictors,sweep,analysis,summary"]


def group_budget(model: str, groups: int) -> str:
    """--memory-budget-gb whose groups split the model's layers into `groups` (the lookback layers included)."""
    from transformers import AutoConfig

    facts = plan.model_facts(model, AutoConfig.from_pretrained(REPO / "pretrained_models" / model))
    layers = facts.dims.num_layers
    lookback = run_study.input_lookback("lookahead", layers)
    per_layer = plan.layer_collection_bytes(facts.dims, 150, facts.gated)
    return str((-(-layers // groups) + lookback) * per_layer / 2**30)


def clean(value, roots: dict[str, str]):
    """Drop times (seconds, *_s) and provenance (the git state, the collection's manifest), name paths by role."""
    if isinstance(value, dict):
        return {k: clean(v, roots) for k, v in value.items()
                if k not in ("provenance", "timings", "seconds", "source", "data") and not k.endswith("_s")}
    if isinstance(value, list):
        return [clean(v, roots) for v in value]
    if isinstance(value, str):
        for path, name in roots.items():
            value = value.replace(path, name)
    return value


def results(out: Path, model: str, roots: dict[str, str]) -> dict:
    analysis = out / "analysis" / model
    found = {name: clean(json.loads((analysis / f"{name}.json").read_text()), roots)
             for name in ("recall_summary", "sparsity_stats", "label_sweep", "drift")}
    found = {name: {key: found[name].get(key) for key in ("records", "capacity", "folds", "summary", "k1_intervals",
                                                           "sample", "massive_dims", "centring", "layers")}
             for name in found}
    for path in sorted((out / "predictors" / model).glob("*/*_summary.csv")):
        found[str(path.relative_to(out))] = list(csv.reader(path.open()))
    for path in sorted((out / "predictors" / model).glob("*/*_layer*.json")):
        found[str(path.relative_to(out))] = clean(json.loads(path.read_text()), roots)
    found["sweep"] = clean(list(csv.reader((out / "sweep" / model / "sweep.csv").open())), roots)
    return found


@pytest.mark.parametrize("model, groups", [("tiny-opt", 2), ("tiny-llama", 2), ("tiny-llama", 1)])
def test_online_study_equals_the_mmap_study(model, groups, tmp_path, capsys):
    """Several groups, and one group holding every layer (a host with enough RAM: the record of the collection is
    then written before any group marker exists)."""
    source = f"{model}={REPO / 'pretrained_models' / model}"
    budget = ["--memory-budget-gb", group_budget(model, groups)]
    log = tmp_path / "mmap.log"
    with open(log, "w") as f:  # the mmap study in a process of its own, beside the online one (two cores)
        mmap_study = subprocess.Popen([sys.executable, str(REPO / "scripts/run_study.py"), source, "--out-dir",
                                       str(tmp_path / "mmap"), *SMALL, *budget, "--collection", "mmap"],
                                      cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    online = tmp_path / "rows"
    run_study.main([source, "--out-dir", str(tmp_path / "online"), *SMALL, *budget, "--collection", "online",
                    "--online-dir", str(online)])
    assert mmap_study.wait() == 0, log.read_text()[-3000:]
    out = capsys.readouterr().out
    assert f"{groups} groups, {groups} forward passes" in out  # the plan's count ...
    stages = json.loads((tmp_path / "online" / run_study.STUDY_MANIFEST).read_text())["stages"]
    ran = [s["stage"] for s in stages if s["stage"].startswith("collect (layers")]
    assert len(ran) == groups, ran  # ... is what the study ran
    assert not any(online.iterdir()) and not (tmp_path / "online" / "data").exists()  # no activation left
    run_study.main([source, "--out-dir", str(tmp_path / "online"), *SMALL, *budget, "--collection", "online",
                    "--online-dir", str(online)])  # a rerun skips every finished group
    rerun = capsys.readouterr().out
    assert rerun.count("done earlier, skipped") >= groups and " ...\n" not in rerun
    record = json.loads((tmp_path / "online" / "analysis" / model / "online" / "manifest.json").read_text())
    assert len(record["online_groups"]) == groups and record["complete"] is True
    mmap = results(tmp_path / "mmap", model, {str(tmp_path / "mmap" / "data" / f"{model}_c4"): "<data>",
                                              str(tmp_path / "mmap"): "<out>"})
    assert results(tmp_path / "online", model, {str(online / f"{model}_c4"): "<data>",
                                                str(online / f"{model}_drift"): "<data>",
                                                str(tmp_path / "online"): "<out>"}) == mmap
    assert len(mmap["recall_summary"]["records"]) > 0 and len(mmap["drift"]["records"]) > 0
    assert mmap["recall_summary"]["capacity"] and mmap["recall_summary"]["folds"] and len(mmap["sweep"]) > 2


def test_an_online_group_larger_than_the_online_dir_is_refused_before_it_starts(tmp_path, monkeypatch):
    monkeypatch.setattr(run_study, "free_disk", lambda path: 0)
    source = f"tiny-llama={REPO / 'pretrained_models/tiny-llama'}"
    with pytest.raises(SystemExit, match=rf"tiny-llama: an online group needs .* bytes\) in {tmp_path / 'rows'}, "
                                         r"which has 0\.0 GiB free"):
        run_study.main([source, "--out-dir", str(tmp_path / "out"), *SMALL[:SMALL.index("--stages")],
                        "--stages", "requests,convert,collect", "--collection", "online", "--online-dir",
                        str(tmp_path / "rows"), "--memory-budget-gb", "1"])
    assert not (tmp_path / "rows").exists()


def test_layer_groups_fit_the_budget_with_the_lookback_layers():
    assert plan.layer_groups(6, 10, 50, 2) == [range(0, 3), range(3, 6)]
    assert plan.layer_groups(5, 10, 40, 2) == [range(0, 2), range(2, 4), range(4, 5)]
    assert plan.layer_groups(6, 10, 1000, 2) == [range(0, 6)]
    assert plan.layer_groups(6, 10, 29, 2) == []  # not one layer with its two earlier ones


@pytest.mark.parametrize("fits", [True, False])
def test_auto_collection_takes_the_online_path_exactly_when_the_mmap_path_does_not_fit(fits, tmp_path, capsys,
                                                                                       monkeypatch):
    need = 10 << 30
    monkeypatch.setattr(run_study, "mmap_need_and_free", lambda plans, out: (need, need + 1 if fits else need - 1))
    source = f"tiny-llama={REPO / 'pretrained_models/tiny-llama'}"
    out, rows = tmp_path / "out", tmp_path / "rows"
    run_study.main([source, "--out-dir", str(out), *SMALL[:SMALL.index("--stages")], "--stages",
                    "requests,convert,collect", "--collection", "auto", "--online-dir", str(rows),
                    "--memory-budget-gb", group_budget("tiny-llama", 1)])
    chosen = "mmap" if fits else "online"
    assert f"--collection auto: {chosen} " in capsys.readouterr().out
    collection = out / "data" / "tiny-llama_c4" / "manifest.json"
    record = out / "analysis" / "tiny-llama" / "online" / "manifest.json"
    assert (collection if fits else record).is_file() and not (record if fits else collection).exists()
    assert json.loads((collection if fits else record).read_text())["complete"] is True

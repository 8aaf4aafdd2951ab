"""scripts/study/task_sweep.py on the local task with a tiny OPT: one row per (mode, budget, task), a resume that computes
nothing again, and the report's downstream section."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from Decentralized_FM_alpha.lm_eval_model import DejaVuLM
from scripts.assets import make_local_task
from scripts.report import report
from scripts.study import task_sweep
from tests.helpers_models import make_opt
from tests.test_sparse_inference import write_predictors

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def test_task_sweep_writes_every_setting_resumes_and_feeds_the_report(tmp_path, tiny_tokenizer_dir, monkeypatch):
    model, _, converted = make_opt(tmp_path, tiny_tokenizer_dir, seed=31)
    write_predictors(tmp_path / "pred", model, "opt", seed=6)
    tasks = make_local_task.main(["--out-dir", str(tmp_path / "tasks"), "--num-examples", "6", "--max-words", "24"])
    out = tmp_path / "sweep"
    argv = ["--model-name", str(converted), "--include-path", str(tasks),
            "--tasks", ",".join(make_local_task.LOCAL_TASKS),
            "--modes", "oracle", "predictor", "random", "--blocks", "both", "--mlp-topk", "0.25", "0.5",
            "--att-topk", "2", "3",
            "--predictor-dir", str(tmp_path / "pred"), "--limit", "4", "--bootstrap-iters", "100", "--batch", "8",
            "--out-dir", str(out)]
    built = []
    original_init = DejaVuLM.__init__

    def counting_init(self, *a, **k):
        built.append(k.get("sparse_mode"))
        original_init(self, *a, **k)

    monkeypatch.setattr("Decentralized_FM_alpha.lm_eval_model.DejaVuLM.__init__", counting_init)
    rows = task_sweep.main(argv)
    monkeypatch.undo()
    assert built == ["dense"]  # one model for every setting, the dense one first
    settings = [("dense", "dense", "dense")] + [(m, mlp, att) for m in ("oracle", "predictor", "random")
                                                for mlp, att in (("0.25", "2"), ("0.5", "3"))]
    assert [(r["mode"], r["mlp_topk"], r["att_topk"], r["task"]) for r in rows] == \
        [(*s, t) for s in settings for t in make_local_task.LOCAL_TASKS]
    with open(out / "tasks.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(settings) * 2 and [r["task"] for r in table[:2]] == list(make_local_task.LOCAL_TASKS)
    for row in table:
        assert 0 <= float(row["acc"]) <= 1 and float(row["acc_stderr"]) >= 0 and row["samples"] == "4"
        assert not Path(row["result_json"]).is_absolute()  # relative to the table's folder: it moves with it
        result = json.loads((out / row["result_json"]).read_text())
        assert result["identity"]["mode"] == row["mode"] and result["git_commit"]
        info = result["model_info"]["dejavu"]
        assert info["model_type"] == "opt-ml-att-sparse" and info["sparsity"]["mode"] == row["mode"]
        if row["mode"] != "dense":
            assert info["sparsity"]["mode"] == row["mode"] and row["block"] == "both"
            assert set(info["sparsity"]["mlp_budgets"].values()) == {float(row["mlp_topk"])}
            assert row["att_kept"] == row["att_topk"] and row["dense_layers"] == "0"
    mc = [r for r in table if r["task"] == make_local_task.MULTIPLE_CHOICE]
    assert all(r["acc_norm"] != "" for r in mc) and "perplexity=" in table[1]["other_metrics"]
    lastword = [r["other_metrics"] for r in table if r["task"] == make_local_task.LASTWORD]
    assert len(set(lastword)) == len(settings)  # every setting changes the perplexity of the last words
    assert "| dense | none | dense | dense |" in (out / "tasks.md").read_text()

    # resume: every result is reused, no model is built, the table is the same
    stamps = {r["result_json"]: (out / r["result_json"]).stat().st_mtime_ns for r in table}
    monkeypatch.setattr("Decentralized_FM_alpha.lm_eval_model.DejaVuLM.__init__",
                        lambda *a, **k: pytest.fail("a finished setting was evaluated again"))
    assert task_sweep.main(argv) == rows
    assert {p: (out / p).stat().st_mtime_ns for p in stamps} == stamps
    with pytest.raises(SystemExit, match="limit"):
        task_sweep.main([*argv[:-2], "--limit", "3", "--out-dir", str(out)])

    report.build_report([out / "tasks.csv"], tmp_path / "report")
    section = (tmp_path / "report" / "appendix_downstream_tasks.md").read_text()
    assert section.count(f"| opt_converted | {make_local_task.MULTIPLE_CHOICE} |") == len(settings)
    dense = json.loads((out / "runs" / "dense" / f"{make_local_task.MULTIPLE_CHOICE}.json").read_text())
    examples = dense["per_example"][make_local_task.MULTIPLE_CHOICE]
    mc_dense = next(r for r in table if r["task"] == make_local_task.MULTIPLE_CHOICE and r["mode"] == "dense")
    assert len(examples["acc"]) == 4 and sum(examples["acc"]) / 4 == pytest.approx(float(mc_dense["acc"]))


def test_task_sweep_shards_evaluate_every_nth_setting_and_the_unsharded_run_tables_them(tmp_path, tiny_tokenizer_dir,
                                                                                        monkeypatch):
    model, _, converted = make_opt(tmp_path, tiny_tokenizer_dir, seed=32)
    tasks = make_local_task.main(["--out-dir", str(tmp_path / "tasks"), "--num-examples", "5", "--max-words", "24"])

    def argv(out: Path) -> list[str]:
        return ["--model-name", str(converted), "--include-path", str(tasks), "--tasks", make_local_task.LASTWORD,
                "--modes", "oracle", "random", "--blocks", "mlp", "--mlp-topk", "0.25", "0.5", "--att-topk", "2",
                "--limit", "4", "--bootstrap-iters", "100", "--batch", "4", "--out-dir", str(out)]

    whole = task_sweep.main(argv(tmp_path / "whole"))
    sharded = tmp_path / "sharded"
    first = task_sweep.main([*argv(sharded), "--shard", "0/2"])
    key = lambda r: (r["mode"], r["mlp_topk"])  # noqa: E731
    with monkeypatch.context() as patched:  # --table-only: the finished results alone, nothing evaluated
        patched.setattr("Decentralized_FM_alpha.lm_eval_model.DejaVuLM.__init__",
                        lambda *a, **k: pytest.fail("--table-only evaluated a setting"))
        partial = task_sweep.main([*argv(sharded), "--table-only"])
    assert [(key(r), r["acc"]) for r in partial] == [(key(r), r["acc"]) for r in first]
    missing = json.loads((sharded / "tasks.manifest.json").read_text())["missing"]
    assert len(missing) == 2 and all(m.endswith(f"/{make_local_task.LASTWORD}") for m in missing)
    assert len((sharded / "tasks.csv").read_text().splitlines()) == 1 + len(first)
    with pytest.raises(SystemExit):  # a table of one shard's settings would read as the whole table
        task_sweep.main([*argv(sharded), "--table-only", "--shard", "1/2"])
    second = task_sweep.main([*argv(sharded), "--shard", "1/2"])
    assert [key(r) for r in first] == [("dense", "dense"), ("oracle", "0.5"), ("random", "0.5")]
    assert [key(r) for r in second] == [("oracle", "0.25"), ("random", "0.25")]

    monkeypatch.setattr("Decentralized_FM_alpha.lm_eval_model.DejaVuLM.__init__",
                        lambda *a, **k: pytest.fail("a setting a shard finished was evaluated again"))
    tabled = task_sweep.main(argv(sharded))
    measured = lambda rows: [(key(r), r["acc"], r["other_metrics"]) for r in rows]  # noqa: E731
    assert measured(tabled) == measured(whole) and (sharded / "tasks.csv").is_file()
    assert len({r["other_metrics"] for r in tabled}) == len(tabled)  # every setting scored differently
    with pytest.raises(SystemExit):
        task_sweep.main([*argv(sharded), "--shard", "2/2"])

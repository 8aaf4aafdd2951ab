"""scripts/run_study.py --stages: only the chosen stages run; a stage whose inputs were not made names the file; the
plan's bytes, the disk refusal and --collection auto's choice."""
from __future__ import annotations

import json
import signal

import pytest

from scripts import run_study
from tests.runner_helpers import REPO

TINY = f"tiny-llama={REPO / 'pretrained_models/tiny-llama'}"
SMALL = ["--device", "cpu", "--train-docs", "3", "--val-docs", "2", "--wiki-windows", "1", "--max-seq-len", "64"]


def test_stages_runs_only_the_chosen_stages(tmp_path, capsys):
    handler = signal.getsignal(signal.SIGTERM)
    run_study.main([TINY, "--out-dir", str(tmp_path), *SMALL, "--stages", "requests,convert"])
    assert signal.getsignal(signal.SIGTERM) is handler  # not left to later code of the process (forked pool workers)
    stages = json.loads((tmp_path / run_study.STUDY_MANIFEST).read_text())["stages"]
    assert sorted((s["model"], s["stage"]) for s in stages) == [
        ("all", "requests"), ("tiny-llama", "convert"), ("tiny-llama", "requests")]
    assert all(s["seconds"] > 0 for s in stages)
    assert (tmp_path / "converted/tiny-llama/conversion_manifest.json").is_file()
    assert len((tmp_path / "requests/c4_train.jsonl").read_text().splitlines()) == 3
    assert (tmp_path / "requests/wikitext2_tiny-llama.jsonl").is_file()
    for unrun in ("data", "predictors", "sweep", "tasks", "report", "requests/lm_eval_tasks"):
        assert not (tmp_path / unrun).exists(), unrun
    out = capsys.readouterr().out
    assert "tiny-llama: collect: not in --stages, skipped" in out and "no report" in out


def test_a_stage_without_its_inputs_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"converted/tiny-llama/config\.json"):
        run_study.main([TINY, "--out-dir", str(tmp_path), *SMALL, "--stages", "predictors"])


def test_unknown_stage_is_an_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run_study.main([TINY, "--out-dir", str(tmp_path), "--stages", "collect,trian"])
    assert "unknown stages ['trian']" in capsys.readouterr().err


def test_plan_counts_the_bytes_a_collection_writes_and_refuses_a_disk_too_small(tmp_path, monkeypatch, capsys):
    run_study.main([TINY, "--out-dir", str(tmp_path), *SMALL, "--collect-tokens", "150",
                    "--stages", "requests,convert,collect"])
    data = tmp_path / "data/tiny-llama_c4"
    assert json.loads((data / "manifest.json").read_text())["rows_written"] == 150  # the capacity was filled
    written = sum(f.stat().st_size for f in data.iterdir() if f.suffix in (".mmap", ".npy"))
    run_study.main([TINY, "--out-dir", str(tmp_path), *SMALL, "--collect-tokens", "150", "--plan"])
    out = capsys.readouterr().out
    assert f"activations {written / 2**30:,.1f} GiB (exact: 150 rows x {written // 150:,} bytes)" in out
    from scripts.study import plan
    from transformers import AutoConfig

    facts = plan.model_facts("tiny-llama", AutoConfig.from_pretrained(REPO / "pretrained_models/tiny-llama"))
    assert plan.collection_bytes(facts.dims, 150, gated=True) == written
    monkeypatch.setattr(plan, "free_disk", lambda path: written // 2)
    with pytest.raises(SystemExit, match=rf"mmap path .* needs .* bytes: tiny-llama .* has .* free \({written // 2:,} bytes\)"):
        run_study.main([TINY, "--out-dir", str(tmp_path / "other"), *SMALL, "--collect-tokens", "150", "--stages",
                        "requests,convert,collect", "--collection", "mmap"])
    assert not (tmp_path / "other" / "data").exists()
    capsys.readouterr()
    run_study.main([TINY, "--out-dir", str(tmp_path), *SMALL, "--collect-tokens", "150", "--stages", "requests"])
    assert "--collection auto: online (the mmap path needs" in capsys.readouterr().out  # the default: what fits


def test_the_default_memory_budget_is_most_of_the_online_dirs_free_space(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(run_study, "free_disk", lambda path: 10 * 2**30)
    run_study.main([TINY, "--out-dir", str(tmp_path), *SMALL, "--online-dir", str(tmp_path / "rows"), "--plan"])
    out = capsys.readouterr().out
    assert f"--memory-budget-gb 9: 0.9 of the free space of {tmp_path / 'rows'}" in out
    assert "a budget of 9 GiB holds" in out  # the plan's groups use it


def test_the_task_table_is_written_again_when_its_command_changes(tmp_path):
    """A tasks.manifest.json counts as done for the very task_sweep.py command that wrote it only: other modes (or
    tasks, budgets, limit) rerun the sweep, which reuses the finished (setting, task) results."""
    def command(*modes):
        return run_study.python("scripts/study/task_sweep.py", "--tasks", "dejavu_cb", "--modes", *modes,
                                "--out-dir", tmp_path)

    manifest = tmp_path / "tasks.manifest.json"
    assert not run_study.tasks_done(manifest, command("oracle"))
    manifest.write_text(json.dumps({"argv": command("oracle")[1:]}))  # sys.argv of that run: script, then its flags
    assert run_study.tasks_done(manifest, command("oracle"))
    assert not run_study.tasks_done(manifest, command("oracle", "random"))


def test_the_plan_estimates_every_fitted_stage_of_a_model_of_the_fitted_shape(tmp_path, monkeypatch, capsys):
    """bench_study.py's stage fits (a + b x driver) give the plan's time of every stage, the sweep's and tasks'
    slopes scaled by the planned settings over the measured ones; another shape gets none of them."""
    from transformers import AutoConfig

    from scripts.assets.dejavu_tasks import documents_per_setting
    from scripts.study import plan
    from scripts.study.sparse_sweep import plan_settings

    config = AutoConfig.from_pretrained(REPO / "pretrained_models/tiny-llama")
    facts = plan.model_facts("tiny-llama", config)
    dims = {"hidden_size": facts.dims.hidden_size, "num_layers": facts.dims.num_layers,
            "ffn_dim": facts.dims.ffn_dim, "num_heads": facts.dims.num_heads, "num_kv_heads": facts.dims.num_kv_heads}
    fits = [{"model": "bench", "stage": "summary", "a_s": 7.0, "b_s_per_unit": 0.25, "settings": None,
             "points": [[1, 7.25], [2, 7.5]]},
            {"model": "bench", "stage": "tasks", "a_s": 3.0, "b_s_per_unit": 2.0, "settings": 4,
             "points": [[5, 13], [10, 23]]},
            {"model": "bench", "stage": "convert", "a_s": 11.0, "b_s_per_unit": 0.0, "settings": None,
             "points": [[0, 11]]}]
    path = tmp_path / "stage_fits.json"
    path.write_text(json.dumps({"dims": {"bench": dims}, "fits": fits}))
    monkeypatch.setattr(plan, "STAGE_FITS", path)
    run_study.main([TINY, "--out-dir", str(tmp_path / "out"), *SMALL, "--collect-tokens", "120", "--task-limit", "3",
                    "--plan"])
    out = capsys.readouterr().out
    modes = run_study.build_parser().get_default("modes")  # the study's default modes (structured is not one)
    budgets = run_study.build_parser().get_default("mlp_budgets")
    settings = len(plan_settings(modes, budgets, budgets, ["mlp", "att", "both"],
                                 ["heads", "groups"] if facts.dims.num_kv_heads < facts.dims.num_heads else ["heads"],
                                 True))
    assert f"summary: {7 + 0.25 * 120:,.0f} s" in out
    assert f"tasks: {3 + 2.0 * documents_per_setting(3) * settings / 4:,.0f} s" in out
    assert "convert: 11 s" in out and out.count("stage_fits.json (bench)") == 3
    dims["hidden_size"] += 1  # another shape: the fits do not apply
    path.write_text(json.dumps({"dims": {"bench": dims}, "fits": fits}))
    run_study.main([TINY, "--out-dir", str(tmp_path / "out"), *SMALL, "--plan"])
    assert "stage_fits.json" not in capsys.readouterr().out

"""scripts/run_study.py --stages: only the chosen stages run; a stage whose inputs were not made names the file."""
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

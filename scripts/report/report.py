"""One markdown report, OPT vs Llama, from any set of result folders: tables, figures and where every number came from.

Inputs (files, or folders searched recursively) are recognised by content:
  collection        a folder with manifest.json listing collected kinds (SPEC §6)
  drift / lookahead / sparsity_stats / label_sweep
                    the JSONs of scripts/analysis/drift.py, lookahead.py, sparsity_stats.py ("analysis" key)
  predictors        {mlp,att}_layer{L}.json of the predictor trainer (SPEC §7), with {block}_summary.csv if present
  perplexity sweep  a CSV with columns model,dataset,mode,perplexity (and mlp_topk, att_topk, tokens,
                    output_manifest, ...), one row per sparse-inference run (SPEC §8)
  task sweep        a CSV with columns model,task,mode,acc,acc_stderr (and mlp_topk, att_topk, result_json, ...),
                    one row per (mode, budget, task) of scripts/study/task_sweep.py (SPEC §11)
Every table row carries a source id [S<n>]; the Sources table gives its file, command, git commit and manifest
(from the provenance block every JSON of this project carries). Sentences in the report are generated from the
numbers and only describe them. Inputs that do not exist, predictor layers without a JSON, sweep rows whose
manifest is absent and sections with no input are listed under "Missing".

    python scripts/report/report.py data/opt-6.7b_c4 data/llama-3.2-3b_c4 out/drift out/lookahead out/sparsity \\
        data/opt-6.7b_c4_sparse_predictor data/llama-3.2-3b_c4_sparse_predictor out/sweep.csv --out-dir out/report
Writes <out-dir>/report.md and its figures under <out-dir>/figures/.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # lets `python scripts/report/report.py` run

from Decentralized_FM_alpha.utils.manifest import base_manifest  # noqa: E402
from sparse_predictor.trainer.metrics import METRIC_DEFINITIONS  # noqa: E402
from scripts.analysis.common import model_colors  # noqa: E402
from scripts.report.plots import plot_perplexity, plot_predictors, plot_results, plot_tasks  # noqa: E402
from scripts.analysis.sparsity_stats import STATISTIC_DEFINITIONS  # noqa: E402
from scripts.report.baselines import baselines_section  # noqa: E402
from scripts.report.inputs import Sources, all_models, discover  # noqa: E402
from scripts.report.sections import (collections_section, drift_section, figure_lines,  # noqa: E402
                                     label_sweep_section, lookahead_section, perplexity_section,
                                     predictors_section, result_source, sparsity_section,
                                     stages_section, summary_section, table, tasks_section)

SECTIONS = ("Collections", "Residual-stream drift", "Lookahead", "Sparsity statistics", "Label sensitivity",
            "Predictors", "Perplexity sweep", "Downstream tasks")
DEFINITIONS = {
    **{k: METRIC_DEFINITIONS[k]
       for k in ("Recall", "True Sparsity", "Classifier Sparsity", "Precision", "Recall@K", "K")},
    "Drift cosine": "cosine similarity between the same token's x_l and x_{l+k} (att_x: residual stream entering "
                    "the layer; mlp_x: after the attention residual add). raw: as stored; normed: both through layer "
                    "l+k's norm (see each result's normalisation line). 'without_massive' drops the listed dims",
    "Lookahead cell (l, j)": "held-out metrics of a predictor for layer l's labels trained from att_x_{l-j}",
    **{f"sparsity: {k}": v for k, v in STATISTIC_DEFINITIONS.items()},
    "Perplexity": "exp(-mean of token_logprobs[1:] over all requests), the original DejaVu convention",
    "Downstream acc": "lm-evaluation-harness accuracy of the task (acc: the highest-likelihood choice is the gold "
                      "one, or the gold continuation is the greedy one; acc_norm: likelihoods normalised by the "
                      "choice's length in bytes) with the harness's standard error, on the model of the row's mode "
                      "and budget (scripts/study/task_sweep.py)",
}


# ------------------------------------------------------------------------------------- the report
def build_report(paths: Sequence[Path], out_dir: Path, notes: Sequence[str] = ()) -> Path:
    """Write <out_dir>/report.md (and figures) from the inputs; returns its path. `notes` are printed first."""
    provenance = base_manifest(kind="report")
    inputs = discover(paths)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = out_dir / "figures"
    models = all_models(inputs)
    colors = model_colors(models)
    for results in inputs.results.values():  # every table and sentence lists the models in one order
        results.sort(key=lambda item: models.index(item[1]["source"]["model"]))
    inputs.predictors.sort(key=lambda s: models.index(s.model))
    sources, missing = Sources(), list(inputs.missing)
    summary_lines, decomposition_lines = summary_section(inputs, sources, out_dir, missing)
    baseline_lines, baseline_figures = baselines_section(
        [(result_source(sources, p, r), r) for p, r in inputs.results["recall_summary"]],
        [(result_source(sources, p, r), r) for p, r in inputs.results["drift"]], out_dir)
    analysis_sections = (("Residual-stream drift", "drift", drift_section),
                         ("Lookahead", "lookahead", lookahead_section),
                         ("Sparsity statistics", "sparsity_stats", sparsity_section),
                         ("Label sensitivity", "label_sweep", label_sweep_section))
    present = {"Collections": bool(inputs.collections), "Predictors": bool(inputs.predictors),
               "Perplexity sweep": bool(inputs.sweeps), "Downstream tasks": bool(inputs.task_sweeps),
               **{title: bool(inputs.results[analysis]) for title, analysis, _ in analysis_sections}}
    body: dict[str, list[str]] = {}
    if present["Collections"]:
        body["Collections"] = collections_section(inputs, sources)
    for title, analysis, make in analysis_sections:
        if present[title]:
            results = inputs.results[analysis]
            body[title] = make(results, sources) + figure_lines(
                plot_results([r for _, r in results], figures, colors), out_dir)
    if present["Predictors"]:
        summaries = {(s.model, s.block): [rec for _, rec in s.records] for s in inputs.predictors}
        body["Predictors"] = predictors_section(inputs.predictors, sources, missing) + figure_lines(
            plot_predictors(summaries, colors, figures), out_dir)
    if present["Perplexity sweep"]:
        body["Perplexity sweep"] = perplexity_section(inputs.sweeps, sources, missing) + figure_lines(
            plot_perplexity([row for _, rows in inputs.sweeps for row in rows], colors, figures), out_dir)
    if present["Downstream tasks"]:
        body["Downstream tasks"] = tasks_section(inputs.task_sweeps, sources, missing) + figure_lines(
            plot_tasks([row for _, rows in inputs.task_sweeps for row in rows], colors, figures), out_dir)
    missing += [f"section '{title}': no input of this kind was given" for title in SECTIONS if not present[title]]

    lines = ["# DejaVu on OPT and Llama: analysis report", "",
             f"Generated by `{provenance['command']}` at commit `{provenance['git_commit']}` on "
             f"{provenance['start_time']}. Every table row names its source [S<n>]: see Sources for the file, "
             f"command, commit and manifest.", ""]
    lines += [f"> **Note.** {note}\n" for note in notes]
    lines += ["## Summary", ""] + summary_lines
    lines += ["## Decomposition", ""] + decomposition_lines
    lines += ["## Baselines and controls", ""] + baseline_lines + figure_lines(baseline_figures, out_dir)
    if inputs.studies:
        lines += ["## Study stages", ""] + stages_section(inputs.studies, sources)
    lines += ["## Inputs", ""]
    lines += [f"- `{p}`" for p in paths]
    lines += [f"- not recognised (no known result inside): `{u}`" for u in inputs.unrecognised]
    lines += ["", "## Definitions", ""] + [f"- **{k}**: {v}" for k, v in DEFINITIONS.items()] + [""]
    for title in SECTIONS:
        lines += [f"## {title}", ""] + body.get(title, ["Missing: no input of this kind was given.", ""])
    lines += ["## Missing", ""] + ([f"- {m}" for m in missing] or ["Nothing missing."]) + [""]
    lines += ["## Sources", ""] + table(["id", "file", "command", "commit", "manifest"],
                                        [[s["id"], s["file"], f"`{s['command']}`", s["commit"], s["manifest"]]
                                         for s in sources.rows])
    report = out_dir / "report.md"
    report.write_text("\n".join(lines))
    print(f"wrote {report}: {sum(present.values())} of {len(SECTIONS)} sections, {len(sources.rows)} sources, "
          f"{len(missing)} missing items, figures in {figures}")
    return report


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", type=Path,
                        help="result folders (searched recursively) or files: collections, analysis JSONs, "
                             "predictor out-dirs, perplexity-sweep and task-sweep CSVs")
    parser.add_argument("--out-dir", type=Path, required=True, help="where report.md and figures/ are written")
    parser.add_argument("--note", action="append", default=[],
                        help="a sentence shown at the top of the report (repeat), e.g. what the models are")
    args = parser.parse_args(argv)
    return build_report(args.inputs, args.out_dir, args.note)


if __name__ == "__main__":
    main()

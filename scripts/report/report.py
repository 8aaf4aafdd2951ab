"""One report, OPT vs Llama, from any set of result folders: the answer on its first screen, figures, appendices and
where every number came from.

Inputs (files, or folders searched recursively) are recognised by content:
  collection        a folder with manifest.json listing collected kinds (SPEC §6)
  drift / lookahead / sparsity_stats / label_sweep / recall_summary
                    the JSONs of scripts/analysis/*.py ("analysis" key)
  predictors        {mlp,att}_layer{L}.json of the predictor trainer (SPEC §7), with {block}_summary.csv if present
                    (the per-budget folders b{k}/: Recall@K over every layer)
  perplexity sweep  a CSV with columns model,dataset,mode,perplexity (and mlp_topk, att_topk, tokens,
                    output_manifest, ...), one row per sparse-inference run (SPEC §8)
  task sweep        a CSV with columns model,task,mode,acc,acc_stderr (and mlp_topk, att_topk, result_json, ...),
                    one row per (mode, budget, task) of scripts/study/task_sweep.py (SPEC §11)
  layer sweep       layer_sweep.csv of scripts/study/layer_sweep.py (one layer sparse at a time)
report.md opens with the sparsity each mode sustains (scripts/report/headline.py: the smallest kept fraction at which
perplexity stays within 1% and 5% of dense and the headline task mean within 1 point) and sentences built from it by a
printed rule, where and why lines from the layer sweep, on-policy recall and the structured predictor when given, and
what was not run; then Recall@K over every layer, the paper figures (scripts/report/figures.py; gallery in
figures/README.md) and links to appendix_*.md: the Answer by budget (its sentences compare numbers under the flags
--within and --acc-within), the summary and decomposition, baselines, one appendix per kind of input, and the glossary,
sources and provenance. Every table row carries a source id [S<n>]; the Sources table gives its file, command, git
commit and manifest. Markdown tables have at most 10 columns (summary.csv and the inputs' CSVs hold everything).

    python scripts/report/report.py data/opt-6.7b_c4 data/llama-3.2-3b_c4 out/drift out/lookahead out/sparsity \\
        data/opt-6.7b_c4_sparse_predictor data/llama-3.2-3b_c4_sparse_predictor out/sweep.csv --out-dir out/report
Writes <out-dir>/report.md, <out-dir>/appendix_*.md, summary.csv, baselines.csv and the figures under <out-dir>/figures/.
"""
from __future__ import annotations

import argparse
import csv
import re
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # lets `python scripts/report/report.py` run

from Decentralized_FM_alpha.utils.manifest import base_manifest  # noqa: E402
from sparse_predictor.trainer.metrics import METRIC_DEFINITIONS  # noqa: E402
from scripts.analysis.common import model_colors, model_family, model_label, write_csv_atomic  # noqa: E402
from scripts.analysis.sparsity_stats import STATISTIC_DEFINITIONS  # noqa: E402
from scripts.report.answer import Flags, answer_section, task_results  # noqa: E402
from scripts.report.baselines import baselines_section  # noqa: E402
from scripts.report.speed import speed_section  # noqa: E402
from scripts.report.figures import (CAPTIONS, gallery, plot_contextual_sparsity, plot_layer_cost,  # noqa: E402
                                    plot_quality)
from scripts.report.figures import plot_recall_by_layer as plot_layer_recall  # noqa: E402
from scripts.report.headline import first_screen, headline_csv_columns, headline_rows  # noqa: E402
from scripts.report.inputs import Inputs, Sources, all_models, discover, model_dims  # noqa: E402
from scripts.report.layers import (baseline_layer_recall, block_units, layer_recall_table,  # noqa: E402
                                   model_layers, predictor_layer_recall, uniform_chance)
from scripts.report.plots import plot_predictors, plot_results  # noqa: E402
from scripts.report.why import (decomposition_lines, layer_sweep_lines, on_policy_lines,  # noqa: E402
                                structured_lines)
from scripts.report.summary import headline_dataset  # noqa: E402
from scripts.report.sections import (collections_section, drift_section, figure_lines,  # noqa: E402
                                     label_sweep_section, lookahead_section, perplexity_section,
                                     predictors_section, result_source, sparsity_section,
                                     stages_section, summary_section, table, tasks_section)

SECTIONS = ("Collections", "Residual-stream drift", "Lookahead", "Sparsity statistics", "Label sensitivity",
            "Predictors", "Perplexity sweep", "Downstream tasks")
GLOSSARY = {
    "dense": "the unmodified model (every neuron and head computed); perplexity ratios divide by its perplexity",
    "oracle": "sparse mode keeping each token's top-K units by the size of their exact output: |activation| for MLP "
              "neurons, the norm of the head's output for attention heads. It is what the label ranks by, not an upper "
              "bound on quality (a small output can still matter downstream; a predictor can beat it); its Recall@K is "
              "1 by definition",
    "predictor": "sparse mode keeping the top-K units of DejaVu's trained predictor, fed the lookahead input",
    "random": "sparse mode keeping K units drawn uniformly at random per token",
    "static": "sparse mode / ranking keeping, per layer, the K units most often in the true top-K over the training "
              "documents: the input-independent baseline a predictor must beat to show that it reads its input (not a "
              "floor of quality: it can score below random, e.g. where the frequent units are not the useful ones)",
    "gate": "sparse mode / ranking keeping the top-K units by |SiLU(g)| with g the exact gate pre-activation "
            "(CATS-style, Llama MLP only, no training; OPT has no gate: n/a)",
    "budget": "what a sparse block keeps: a fraction of the MLP neurons, and heads kept of H (or whole key-value "
              "groups, kv groups)",
    "same-layer input": "a predictor for layer l fed layer l's own block input (mlp_x_l for the MLP, att_x_l for "
                        "attention): not available in time at inference",
    "lookahead input": "DejaVu's wiring: the MLP predictor of layer l fed att_x_l, the attention predictor fed "
                       "att_x_(l-1), so the prediction can run ahead of the layer",
    "lookahead penalty": "Recall@K(same-layer input) - Recall@K(lookahead input), paired by layer, seed and document",
    "uniform chance": "what a ranking that ignores the input scores: Recall@K = K / units, a difference 0, a cosine 0",
    "layers pooled": "a pooled number sums over these layers (and seeds); every input of a model pools the same "
                     "set, layer 0 left out (its input is the embedding)",
    "value [low, high]": "an estimate and its 95% percentile-bootstrap interval over held-out documents (perplexity: "
                         "over requests, paired with dense); 's a to b' after it: min to max over training seeds",
    "too noisy to read": "a comparison whose standard error exceeds the flag value its sentence names while its 95% "
                         "interval reaches into the flag's band (so neither 'within' nor 'beyond' can be read): for a "
                         "perplexity ratio the standard error of its log, (ln high - ln low) / 3.92; for an accuracy "
                         "difference the two rows' harness standard errors combined, sqrt(se1^2 + se2^2)",
    "--within": "flag: a perplexity ratio within this relative distance of 1 is called 'within'",
    "--acc-within": "flag: an accuracy difference within this is called 'within'",
    **{k: METRIC_DEFINITIONS[k]
       for k in ("Recall", "True Sparsity", "Classifier Sparsity", "Precision", "Recall@K", "K")},
    "Captured Mass": "the share of the true top-K's |activation| mass (attention: head-norm mass) held by the "
                     "ranking's top-K (1 for the oracle)",
    "drift cosine (same-token)": "cosine between the same token's att_x_l and att_x_(l+k) (att_x: the residual "
                                 "stream entering the layer; mlp_x: after the attention residual add)",
    "cross-token / centred": "the same cosine for pairs of different tokens, and after subtracting each layer's mean "
                             "vector: the baselines of the same-token cosine",
    "raw / normed": "raw: the stored stream; normed: both vectors through layer l+k's norm (each result's "
                    "normalisation line says which)",
    "massive dims": "the few hidden dimensions of largest mean |activation|; 'without massive' drops them",
    "Lookahead cell (l, j)": "held-out metrics of a predictor for layer l's labels trained from att_x_{l-j}",
    **{f"sparsity: {k}": v for k, v in STATISTIC_DEFINITIONS.items()},
    "perplexity": "exp(-mean of token_logprobs[1:] over all requests), the original DejaVu convention",
    "downstream acc": "lm-evaluation-harness accuracy of the task (acc: the highest-likelihood choice is the gold "
                      "one, or the gold continuation is the greedy one; acc_norm: likelihoods normalised by the "
                      "choice's length in bytes) with the harness's standard error, on the model of the row's mode "
                      "and budget (scripts/study/task_sweep.py)",
}


# ------------------------------------------------------------------------------------- the report
@dataclass
class Appendix:
    slug: str
    title: str
    what: str
    lines: list[str]


def write_appendices(appendices: Sequence[Appendix], out_dir: Path) -> None:
    for a in appendices:
        (out_dir / f"appendix_{a.slug}.md").write_text("\n".join(
            [f"## {a.title}", ""] + a.lines + ["", f"Part of [the report](report.md): {a.what}.", ""]))


def model_families(inputs: Inputs) -> dict[str, str]:
    """model -> opt or llama, from every input that says (collections, analysis results)."""
    families = {model_label(m): model_family(m) for _, m in inputs.collections}
    for results in inputs.results.values():
        for _, r in results:
            families.setdefault(r["source"]["model"], r["source"].get("family", ""))
    return families


def recall_headline(inputs: Inputs, dims: dict[str, dict], colors: dict[str, str], figures: Path,
                    fractions: Sequence[float]) -> tuple[list[str], list[Path]]:
    """Recall@K over every layer (per-budget predictors) with the baselines where scored, and F2 at the middle K."""
    layer_recall = predictor_layer_recall(inputs.predictors)
    if not layer_recall:
        return [], []
    ks = sorted({k for _, _, k in layer_recall})
    payloads = [r for _, r in inputs.results["recall_summary"]]
    baselines = {k: baseline_layer_recall(payloads, k) for k in ks}
    lines = ["Held-out Recall@K of DejaVu's lookahead predictor trained at each budget, on every layer from 1 (layer 0 "
             "stays dense): the mean over layers with its min and max; the summary's baselines on the layers it "
             "scored them (named); uniform chance K / units. Each value is one collection and one training run "
             "(seed); the per-layer spread is what the mean hides.", ""]
    lines += layer_recall_table(layer_recall, baselines, dims, all_models(inputs))
    k = min(ks, key=lambda v: abs(v - 0.25))
    per_model = defaultdict(dict)
    for (model, block, kk), points in layer_recall.items():
        if kk == k:
            per_model[model][block] = points
    chance = {m: {b: uniform_chance(k, block_units(dims[m], b)) for b in per_model[m]} for m in per_model if dims.get(m)}
    paths = plot_layer_recall(per_model, baselines[k], chance, model_layers(dims), colors, k, figures)
    return lines + [""], paths


def where_and_why(inputs: Inputs) -> tuple[list[str], list[str]]:
    """The first screen's where (one layer at a time) and why (on-policy recall, the structured predictor) lines:
    their numbers when the inputs hold them, else what was not run."""
    where = layer_sweep_lines(inputs.layer_sweeps) or [
        "not run: no one-layer-at-a-time sweep among the inputs (scripts/study/layer_sweep.py), so the cost per layer "
        "and how much of it compounds are not measured."]
    why = on_policy_lines(inputs.sweeps, predictor_layer_recall(inputs.predictors)) or [
        "not run: no sweep recorded on-policy recall (the mask applied against the same run's true top-K), so recall "
        "on the sparse model's own states is not measured."]
    payloads = [r for _, r in inputs.results["recall_summary"]]
    why += structured_lines(payloads) + decomposition_lines(payloads) or [
        "not run: no predictor shaped like SwiGLU (structured) among the inputs, so the function-class question is "
        "not measured."]
    return where, why


def build_report(paths: Sequence[Path], out_dir: Path, notes: Sequence[str] = (), flags: Flags = Flags()) -> Path:
    """Write <out_dir>/report.md (its first screen answers the question), the appendix_*.md files it links, figures
    and their gallery; returns the report's path."""
    provenance = base_manifest(kind="report")
    inputs = discover(paths)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = out_dir / "figures"
    models = all_models(inputs)
    colors = model_colors(models)
    dims = model_dims(inputs)
    for results in inputs.results.values():  # every table and sentence lists the models in one order
        results.sort(key=lambda item: models.index(item[1]["source"]["model"]))
    inputs.predictors.sort(key=lambda s: models.index(s.model))
    sources, missing = Sources(), list(inputs.missing)
    parts = summary_section(inputs, sources, out_dir, missing, colors)
    answer, not_measured = answer_section(parts.summaries, task_results(inputs.task_sweeps), parts.fractions,
                                          parts.distance, flags)
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
        body["Perplexity sweep"] = perplexity_section(inputs.sweeps, sources, missing, dims)
    if present["Downstream tasks"]:
        body["Downstream tasks"] = tasks_section(inputs.task_sweeps, sources, missing, dims, flags.acc_within)
    not_measured += [f"section '{title}': no input of this kind was given" for title in SECTIONS if not present[title]]

    dataset = headline_dataset(parts.summaries)
    task_rows = [row for _, rows in inputs.task_sweeps for row in rows]
    where, why = where_and_why(inputs)
    if dataset:
        rows = headline_rows(parts.summaries, dataset, task_rows)
        add_summary_columns(out_dir / "summary.csv", headline_csv_columns(rows))  # every first-screen number too
        screen = first_screen(parts.summaries, rows, dataset, model_families(inputs), where, why)
    else:
        screen = ["No perplexity sweep with per-request log-probs among the inputs: the sparsity each mode sustains "
                  "cannot be read."]
    recall_lines, recall_figures = recall_headline(inputs, dims, colors, figures, parts.fractions)
    paper = plot_contextual_sparsity([r for _, r in inputs.results["sparsity_stats"]], colors, figures)
    paper += recall_figures
    paper += plot_quality(parts.summaries, dataset, task_rows, figures) if dataset else []
    paper += plot_layer_cost([row for _, rows in inputs.layer_sweeps for row in rows], figures)
    speed_lines = []
    for path, bench in inputs.benches:
        rows = [row for _, sweep_rows in inputs.sweeps for row in sweep_rows]
        speed_lines += speed_section(rows, bench, figures, out_dir, source=sources.add(path, bench.get("provenance"),
                                                                                        None))
    if not inputs.benches:
        not_measured.append("decode speed: no bench_sparse_decode.py JSON was given")
    if not recall_lines:
        not_measured.append("Recall@K over every layer: no per-budget predictor folder (b{k}/ with its summary CSV)")

    appendices = [Appendix("answer", "Answer", "by budget: drift, the lookahead penalty, and each mode's "
                           "perplexity ratio, task accuracy and Recall@K at every budget, with intervals", answer)]
    if parts.summary:
        appendices.append(Appendix("summary", "Summary and decomposition", "the pooled numbers on identical "
                                   "definitions and their decomposition (activation, input distance, the gate)",
                                   parts.summary + (["## Decomposition", ""] + parts.decomposition
                                                    if parts.decomposition else [])))
    if baseline_figures or not baseline_lines[0].startswith("Missing"):
        appendices.append(Appendix("baselines", "Baselines and controls", "the rankings without a trained predictor, "
                                   "the capacity and data curves and the folds",
                                   baseline_lines + figure_lines(baseline_figures, out_dir)))
    else:
        not_measured.append("section 'Baselines and controls': " + baseline_lines[0])
    if speed_lines:
        appendices.append(Appendix("speed", "What it buys: decode speed with sparse kernels", "the decode bench's "
                                   "speed beside each mode's perplexity", speed_lines))
    for title in SECTIONS:
        if title in body:
            appendices.append(Appendix(title.lower().replace(" ", "_").replace("-", "_"), title,
                                       f"the {title.lower()} inputs in full", body[title]))
    reference = ["## Not measured in this run", ""] + ([f"- {m}" for m in not_measured] or ["Everything was."]) + [""]
    reference += ["## Missing inputs", ""] + ([f"- {m}" for m in missing] or ["Nothing missing."]) + [""]
    reference += ["## Glossary", ""] + [f"- **{k}**: {v}" for k, v in GLOSSARY.items()] + [""]
    if inputs.studies:
        reference += ["## Study stages", ""] + stages_section(inputs.studies, sources)
    reference += ["## Inputs", ""] + [f"- `{p}`" for p in paths]
    reference += [f"- not recognised (no known result inside): `{u}`" for u in inputs.unrecognised]
    reference += ["", "## Sources", "", "Every table row names its source [S<n>]: its file, command, commit and "
                  "manifest.", ""]
    reference += table(["id", "file", "command", "commit", "manifest"],
                       [[s["id"], s["file"], f"`{s['command']}`", s["commit"], s["manifest"]] for s in sources.rows])
    appendices.append(Appendix("reference", "What was not measured, glossary, stages, sources", "what each term "
                               "means and where every number came from", reference))
    write_appendices(appendices, out_dir)

    lines = [f"# DejaVu's contextual sparsity: {', '.join(models)}", ""] + screen + [""]
    if recall_lines:
        lines += ["## Recall@K over every layer", ""] + recall_lines
    paper_figures = [p for p in paper if p.is_file()] + [p for p in (figures / "speed_vs_perplexity.png",)
                                                         if p.is_file() and speed_lines]
    if paper_figures:
        lines += ["## Figures", "", "PNG and PDF, captions in [the gallery](figures/README.md)."]
        lines += [f"- [{p.stem}](figures/{p.name}): {CAPTIONS.get(p.name, '').split('. ', 1)[-1]}" for p in paper_figures]
        lines += [""]
    if notes:
        lines += ["## About this run", ""] + [f"> **Note.** {note}\n" for note in notes]
    lines += ["## Appendices", ""] + [f"- [{a.title}](appendix_{a.slug}.md): {a.what}." for a in appendices] + [""]
    lines += [f"{len(not_measured)} items were not measured and {len(missing)} inputs are missing: "
              f"[the reference appendix](appendix_reference.md) lists them.", ""]
    lines += ["## Statistics", "", STATISTICS_NOTE, ""]
    lines += ["## Provenance", "", f"Generated by `{provenance['command']}` at commit `{provenance['git_commit']}` on "
              f"{provenance['start_time']}, with --within {flags.within:g} and --acc-within {flags.acc_within:g}.", ""]
    report = out_dir / "report.md"
    report.write_text("\n".join(lines))
    gallery([*paper_figures, *sorted(p for p in figures.glob("*.png") if p not in paper_figures)], figures)
    print(f"wrote {report} ({len(lines)} lines) and {len(appendices)} appendices: {sum(present.values())} of "
          f"{len(SECTIONS)} sections, {len(sources.rows)} sources, {len(missing)} missing inputs, {len(not_measured)} "
          f"items not measured, figures in {figures}")
    return report


def add_summary_columns(path: Path, columns: dict[str, dict[str, object]]) -> None:
    """Add per-model columns to summary.csv (its rows are models)."""
    rows = []
    if path.is_file():
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    known = {row["model"] for row in rows}
    rows += [{"model": model} for model in columns if model not in known]
    for row in rows:
        row.update(columns.get(row["model"], {}))
    write_csv_atomic(path, rows, list(dict.fromkeys(k for row in rows for k in row)))


def read_report(path: Path) -> str:
    """report.md followed by every appendix it links, in its order: the whole report as one text (to search it)."""
    text = path.read_text()
    appendices = re.findall(r"\]\((appendix_[a-z_]+\.md)\)", text)
    return "\n".join([text, *((path.parent / a).read_text() for a in dict.fromkeys(appendices))])


STATISTICS_NOTE = ("Every interval is a 95% percentile bootstrap that resamples held-out documents (Recall@K, "
                   "captured mass), validation requests paired with the dense run (C4 perplexity ratios) or whole "
                   "WikiText-2 articles; it holds fixed the one collection of activations, the one training run of "
                   "each predictor (one seed) and the weights: it is the noise of the evaluation sample, not of "
                   "training. A spread over seeds is shown only where two or more seeds ran. Task accuracies carry the "
                   "harness's standard error; a difference between two modes is paired over the same examples where "
                   "per-example scores were stored, else labelled unpaired.")


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", type=Path,
                        help="result folders (searched recursively) or files: collections, analysis JSONs, "
                             "predictor out-dirs, perplexity-sweep and task-sweep CSVs")
    parser.add_argument("--out-dir", type=Path, required=True, help="where report.md and figures/ are written")
    parser.add_argument("--note", action="append", default=[],
                        help="a sentence shown right after the Answer (repeat), e.g. what the models are")
    parser.add_argument("--within", type=float, default=Flags.within,
                        help="the Answer calls a perplexity ratio 'within' when it is within this relative distance "
                             "of 1, and 'too noisy to read' when its standard error exceeds it (default %(default)s)")
    parser.add_argument("--acc-within", type=float, default=Flags.acc_within,
                        help="the same for an accuracy difference (absolute; default %(default)s)")
    args = parser.parse_args(argv)
    return build_report(args.inputs, args.out_dir, args.note, Flags(args.within, args.acc_within))


if __name__ == "__main__":
    main()

"""The report's summary: bootstrap intervals, identical definitions for every model, every number traced."""
from __future__ import annotations

import csv
import json
import re
from collections import defaultdict

import numpy as np
import pytest

from Decentralized_FM_alpha.utils.activation_store import ModelDims
from Decentralized_FM_alpha.utils.intervals import bootstrap, ratio
from scripts.analysis import drift, recall_summary
from scripts.report import report
from tests.analysis_fixtures import write_collection, write_sweep, write_tasks

pytestmark = pytest.mark.usefixtures("one_cpu_thread")
TRAIN = ["--D", "8", "--epochs", "1", "--batch_size", "32", "--device", "cpu", "--seeds", "2", "--fractions",
         "0.25,0.5", "--distance-fraction", "0.25"]


# ------------------------------------------------------------------------------------- intervals
def simulated_documents(rng: np.random.Generator, documents: int, p: float) -> dict:
    """Per document: tokens, and hits drawn with probability p per token (the truth is p)."""
    tokens = rng.integers(20, 80, size=documents)
    return {"hits": rng.binomial(tokens, p), "tokens": tokens}


def test_bootstrap_interval_covers_the_truth_and_shrinks_with_more_documents():
    rng = np.random.default_rng(0)
    covered = 0
    for replication in range(100):
        interval = bootstrap(simulated_documents(rng, 60, 0.3), ratio("hits", "tokens"), seed=replication,
                             resamples=1000)
        covered += interval.low <= 0.3 <= interval.high
    assert covered >= 88  # a 95% interval misses the truth about 5 times in 100
    widths = [np.mean([(lambda i: i.high - i.low)(bootstrap(simulated_documents(rng, n, 0.3), ratio("hits", "tokens"),
                                                             resamples=1000)) for _ in range(10)])
              for n in (20, 80, 320)]
    assert widths[0] > widths[1] > widths[2] > 0


def test_a_constant_metric_has_a_zero_width_interval():
    tokens = np.array([10, 40, 25, 5])
    interval = bootstrap({"hits": 0.4 * tokens, "tokens": tokens}, ratio("hits", "tokens"))
    assert interval.value == pytest.approx(0.4) and interval.low == pytest.approx(0.4)
    assert interval.high == pytest.approx(0.4) and interval.documents == 4


# ------------------------------------------------------------------------------------- identical definitions
def twin_values(seed: int, layers: int = 3, doc_lengths=(14, 9, 15, 10, 8, 14, 11, 13)) -> dict:
    """One set of activations (ReLU-shaped MLP labels), to be stored under an OPT and a Llama model name."""
    rng = np.random.default_rng(seed)
    rows = sum(doc_lengths)
    x = rng.standard_normal((rows, 16)).astype(np.float32)
    values = {}
    for layer in range(layers):
        mlp_x = x + 0.3 * rng.standard_normal(x.shape).astype(np.float32)
        values[("att_x", layer)], values[("mlp_x", layer)] = x, mlp_x
        values[("att_label", layer)] = np.abs(x @ rng.standard_normal((16, 4))).astype(np.float32)
        values[("mlp_label", layer)] = np.maximum(mlp_x @ rng.standard_normal((16, 32)).astype(np.float32) / 4, 0)
        x = mlp_x + 0.3 * rng.standard_normal(x.shape).astype(np.float32)
    return values


@pytest.fixture(scope="module")
def twin_results(tmp_path_factory):
    """OPT and Llama collections holding identical activations, each through recall_summary and drift."""
    root = tmp_path_factory.mktemp("twins")
    values, dims = twin_values(7), ModelDims(16, 32, 4, 4, 3)
    lengths = [14, 9, 15, 10, 8, 14, 11, 13]
    out = {}
    for family, name in (("opt", "facebook/opt-twin"), ("llama", "meta-llama/llama-twin")):
        data = write_collection(root / f"{family}_c4", dims, lengths, values, name, f"{family}-save")
        result = root / "results" / family
        recall_summary.main(["--data-dir", str(data), "--out-dir", str(result), "--test-docs", "3", *TRAIN])
        drift.main(["--data-dir", str(data), "--out-dir", str(result), "--max-distance", "1"])
        out[family] = (data, result)
    return root, out


def test_identical_labels_give_identical_summary_numbers_for_opt_and_llama(twin_results, tmp_path):
    root, results = twin_results
    opt, llama = (json.loads((results[f][1] / "recall_summary.json").read_text())["records"] for f in ("opt", "llama"))
    def numbers(records: list[dict]) -> list[tuple]:  # predictors and baselines, but the gate (n/a for both)
        return [(r["block"], r["layer"], r["input"], r.get("ranking"), r["k"], r.get("seed"), r["K"], r["Recall@K"],
                 r["Captured Mass"]) for r in records if r["label"] == "topk" and r.get("ranking") != "|SiLU(g)|"]
    assert numbers(opt) == numbers(llama)
    assert {r.get("ranking") for r in opt} == {None, "static", "random", "oracle", "|SiLU(g)|"}
    gate = [r for r in opt + llama if r.get("ranking") == "|SiLU(g)|"]
    assert gate and all(r["Recall@K"] is None and r["n/a"].startswith("n/a") for r in gate)
    assert {r["label"] for r in opt} == {"topk", "relu"} and {r["label"] for r in llama} == {"topk"}  # no gate
    report.build_report([results["opt"][0], results["llama"][0], root / "results"], tmp_path / "report")
    rows = {row["model"]: row for row in csv.DictReader(open(tmp_path / "report" / "summary.csv"))}
    keys = [k for k in rows["opt-twin"] if k.startswith(("mlp Recall@K", "att Recall@K", "mlp penalty", "att penalty"))
            and not k.endswith("sources")]
    assert keys and all(rows["opt-twin"][k] == rows["llama-twin"][k] for k in keys)
    assert rows["opt-twin"]["mlp Recall@K 0.25 same uniform chance"] == str(8 / 32)  # K = 8 of 32 neurons for both


def test_every_summary_number_traces_to_a_source_with_command_commit_and_manifest(twin_results, tmp_path):
    root, results = twin_results
    text = report.read_report(report.build_report([results["opt"][0], results["llama"][0], root / "results"],
                               tmp_path / "report"))
    sources = {}
    for line in text.split("## Sources")[1].splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if re.fullmatch(r"S\d+", cells[0]):
            sources[cells[0]] = cells
    summary = text.split("## Summary")[1].split("## Decomposition")[0]
    table_rows = [line for line in summary.splitlines() if line.startswith("| opt-twin") or
                  line.startswith("| llama-twin")]
    # per model: MLP and attention Recall@K at 2 K each, penalty, drift; the architecture label for OPT only (and,
    # where recall_summary.py and drift.py score the baselines, their captured-mass and drift tables)
    assert len(table_rows) >= 2 * (2 + 2 + 1 + 1) + 1
    for line in table_rows:
        ids = re.findall(r"S\d+", line.strip("|").split("|")[-1])
        assert ids, line
        for source in ids:
            _, path, command, commit, manifest = sources[source]
            assert command.strip("`") and "missing" not in (command, commit, manifest), sources[source]
            assert (root / "results").as_posix() in path and manifest.endswith("manifest.json")
    for row in csv.DictReader(open(tmp_path / "report" / "summary.csv")):
        for key, value in row.items():
            if value and key.endswith((" low", " high")):
                prefix = key.rsplit(" ", 1)[0]
                assert re.fullmatch(r"S\d+( S\d+)*", row[f"{prefix} sources"]), key


def test_per_layer_table_shows_each_layers_seed_mean_drift_and_gate_share():
    from scripts.report.summary import per_layer_tables

    def record(block, layer, name, seed, value):
        return {"block": block, "layer": layer, "input": name, "label": "topk", "k": 0.25, "seed": seed,
                "Recall@K": value, "chance Recall@K": 0.25 if block == "mlp" else 0.5}
    records = [record("mlp", 0, "same", 0, 0.6), record("mlp", 0, "same", 1, 0.8),
               record("mlp", 0, "lookahead", 0, 0.5), record("att", 0, "same", 0, 0.9),
               record("mlp", 1, "same", 0, 0.4), record("mlp", 1, "lookahead", 0, 0.3),
               record("att", 1, "same", 0, 0.7), record("att", 1, "lookahead", 0, 0.65)]
    recall = [("S1", {"source": {"model": "m", "dims": {"num_layers": 2}}, "records": records})]
    drift_payload = {"source": {"model": "m"}, "records": [
        {"kind": "att_x", "k": 1, "dims": "all", "space": space, "layer": 0, "mean": value}
        for space, value in (("raw", 0.91), ("normed", 0.87))]}
    sparsity_payload = {"source": {"model": "m"}, "records": [{"layer": 0, "gate_negative_fraction": 0.62},
                                                              {"layer": 1, "gate_negative_fraction": 0.55}]}
    lines = per_layer_tables(recall, [("S2", drift_payload)], [("S3", sparsity_payload)], 0.25)
    rows = [line for line in lines if line.startswith("| 0 ") or line.startswith("| 1 ")]
    assert rows[0] == "| 0 | 0.910 | 0.870 | 0.620 | 0.700 | 0.500 | 0.900 | n/a | n/a | n/a |"
    assert rows[1] == "| 1 | n/a | n/a | 0.550 | 0.400 | 0.300 | 0.700 | 0.650 | n/a | n/a |"
    assert "**m** [S1, S2, S3]; uniform chance of Recall@K: MLP 0.250, attention 0.500" in lines


# ------------------------------------------------------------------------------------- presentation (issue 22)
PATH_LIKE = re.compile(r"\w/\w|\.(json|csv|md|png)\b")  # a/b or a file name: what a path looks like (but n/a)
MODES = ("oracle", "predictor", "random", "static", "gate")


def sections(text: str) -> dict[str, str]:
    return {part.split("\n", 1)[0]: part for part in text.split("\n## ")[1:]}


def table_widths(text: str) -> list[int]:
    """Cells of every markdown table line (escaped pipes are cell content)."""
    return [len(re.split(r"(?<!\\)\|", line.strip())) - 2 for line in text.splitlines() if line.startswith("|")]


@pytest.fixture(scope="module")
def presented(twin_results, tmp_path_factory):
    """The twins' results with a sweep (the lead's columns; static and, for Llama, gate modes) where OPT's predictor
    equals its oracle and Llama's is 1.5 times it, and a task sweep where OPT's rows are precise and Llama's noisy."""
    root, results = twin_results
    out = tmp_path_factory.mktemp("presented")
    ratios = {}
    for model in ("opt-twin", "llama-twin"):
        for budget, oracle in ((0.25, 1.2), (0.5, 1.02)):
            ratios.update({(model, "oracle", "both", budget): oracle, (model, "random", "both", budget): 6.0,
                           (model, "static", "both", budget): 2.0})
            ratios[(model, "predictor", "both", budget)] = oracle if model == "opt-twin" else 1.5 * oracle
            if model == "llama-twin":  # the gate ranks MLP neurons only: its rows keep attention dense
                ratios.update({(model, "oracle", "mlp", budget): 1.05, (model, "gate", "mlp", budget): 1.1})
    sweep = write_sweep(out / "sweep", ratios, ModelDims(16, 32, 4, 4, 3))
    tasks = {}
    for model, stderr in (("opt-twin", 0.005), ("llama-twin", 0.07)):
        tasks[(model, "lastword_mc", "dense", None)] = (0.80, stderr)
        for budget in (0.25, 0.5):
            tasks.update({(model, "lastword_mc", "oracle", budget): (0.79, stderr),
                          (model, "lastword_mc", "predictor", budget): (0.795 if budget == 0.5 else 0.70, stderr),
                          (model, "lastword_mc", "random", budget): (0.30, stderr)})
    task_csv = write_tasks(out / "tasks", tasks)
    inputs = [results["opt"][0], results["llama"][0], root / "results", sweep, task_csv]
    text = report.read_report(report.build_report(inputs, out / "report", notes=[f"models and data under {root}/results"]))
    return out, inputs, text


def test_the_report_opens_with_the_headline_table_and_sentences_built_from_its_cells(presented):
    out, _, _ = presented
    lines = (out / "report" / "report.md").read_text().splitlines()
    screen = lines[:next(i for i, line in enumerate(lines) if line.startswith("## "))]
    assert len(screen) <= 40 and screen[0].startswith("# DejaVu's contextual sparsity: opt-twin, llama-twin")
    assert ("What produced the rows: opt-twin: predictor input lookahead, top-K label trained at each row's budget; "
            "layers kept dense in every sparse mode: 0") in "\n".join(screen)  # input, label, budget, layer policy
    header = next(i for i, line in enumerate(screen) if line.startswith("| model | block"))
    cells = {}
    for row in screen[header + 2:]:
        if not row.startswith("|"):
            break
        parts = [p.strip() for p in row.strip("|").split("|")]
        modes = [m.strip() for m in screen[header].strip("|").split("|")[2:]]
        cells[(parts[0], parts[1].split(":")[0])] = dict(zip(modes, parts[2:]))
    assert cells[("opt-twin", "MLP + attention")]["oracle"].count(" / ") == 2  # <= 1.01 / <= 1.05 / tasks
    sentences = [line for line in screen if line.startswith("- opt-twin.") or line.startswith("- llama-twin.")]
    assert len(sentences) == 2
    units = {"MLP": "neurons", "attention": "heads", "MLP + attention": "neurons"}
    checked = 0
    for (model, block), by_mode in cells.items():
        if block not in units or by_mode.get("predictor", "not run") == "not run":
            continue
        sentence = next(s for s in sentences if s.startswith(f"- {model}."))
        clause = sentence.split(f"{block}: ")[1].split(". ")[0]  # this block's clause
        needed = by_mode["predictor"].split(" / ")[1]
        assert clause.startswith(f"the predictor needs {needed} of the {units[block]} for at most 5% loss")
        assert f"the oracle {by_mode['oracle'].split(' / ')[1]}" in clause
        checked += 1
    assert checked == 2
    row = next(r for r in csv.DictReader(open(out / "report" / "summary.csv")) if r["model"] == "opt-twin")
    value, side = row["headline MLP + attention predictor ppl<=1.05"], row["headline MLP + attention predictor ppl<=1.05 side"]
    shown = {"in": f"{float(value):.2f}", "below": f"<= {float(value):.2f}", "above": f"> {float(value):.2f}"}[side]
    assert cells[("opt-twin", "MLP + attention")]["predictor"].split(" / ")[1] == shown  # summary.csv keeps it


def test_the_answer_appendix_sets_models_side_by_side_without_a_path(presented):
    out, _, text = presented
    answer = sections(text)["Answer"].split("\nPart of [the report]")[0]  # the appendix's link back aside
    assert not PATH_LIKE.search(answer.replace("n/a", "")), PATH_LIKE.search(answer.replace("n/a", ""))
    assert "| quantity | opt-twin | llama-twin |" in answer  # the models side by side
    assert ("| budget | mode | opt-twin: MLP + attention | llama-twin: MLP + attention | opt-twin: MLP only | "
            "llama-twin: MLP only |") in answer
    assert ("| 0.25 of neurons, 1 of 4 heads | predictor | 1.200 [1.200, 1.200] | 1.800 [1.800, 1.800] | n/a | n/a "
            "|") in answer
    assert "| 0.5 of neurons, 2 of 4 heads | gate | n/a | n/a | n/a | 1.100 [1.100, 1.100] |" in answer
    assert "| 0.25 of neurons, 1 of 4 heads | predictor | 0.700 ± 0.005 | 0.700 ± 0.070 |" in answer  # tasks
    # in report.md the note follows the first screen, provenance comes last; the reference appendix ends with sources
    order = list(sections((out / "report" / "report.md").read_text()))
    assert order.index("About this run") < order.index("Appendices") and order[-1] == "Provenance"
    reference = list(sections("\n" + (out / "report" / "appendix_reference.md").read_text()))
    assert reference.index("Glossary") < reference.index("Sources") == len(reference) - 1


def test_no_markdown_table_is_wider_than_the_column_limit(presented):
    from scripts.report.summary import MAX_COLUMNS, table
    widths = table_widths(presented[2])
    assert widths and max(widths) <= MAX_COLUMNS
    with pytest.raises(ValueError, match="at most 10"):
        table([f"c{i}" for i in range(MAX_COLUMNS + 1)], [])


def test_generated_sentences_follow_the_numbers(presented):
    answer = sections(presented[2])["Answer"].split("- **opt-twin**")[1]
    opt, llama = (part.splitlines() for part in answer.split("- **llama-twin**"))
    # predictor = oracle: "within", with the flag that set the threshold; 1.5 x the oracle: by how much
    assert ("  - predictor perplexity against the oracle's, MLP and attention sparse (flag --within 0.1): at 0.25 of "
            "neurons, 1 of 4 heads: within 10% (ratio 1.000 [1.000, 1.000]); at 0.5 of neurons, 2 of 4 heads: within "
            "10% (ratio 1.000 [1.000, 1.000]).") in opt
    assert ("  - predictor perplexity against the oracle's, MLP and attention sparse (flag --within 0.1): at 0.25 of "
            "neurons, 1 of 4 heads: 50% above (ratio 1.500 [1.500, 1.500]); at 0.5 of neurons, 2 of 4 heads: 50% "
            "above (ratio 1.500 [1.500, 1.500]).") in llama
    assert any(line.startswith("  - static perplexity against the oracle's") and "96% above (ratio 1.961" in line
               for line in opt)
    assert ("  - gate perplexity against the oracle's, MLP sparse, attention dense (flag --within 0.1): at 0.25 of "
            "neurons, attention dense: within 10% (ratio 1.048 [1.048, 1.048])") in "\n".join(llama)
    assert not any("gate perplexity" in line for line in opt)  # OPT has no gate mode
    # accuracy: precise rows compare, noisy rows are marked too noisy, with the flag
    assert ("  - task accuracy of the predictor against dense, MLP and attention sparse (flag --acc-within 0.02; "
            "accuracies in the table): lastword_mc: at 0.25 of neurons, 1 of 4 heads: 0.100 below (0.700 vs 0.800, "
            "unpaired standard error 0.007); at 0.5 of neurons, 2 of 4 heads: within 0.02 (0.795 vs 0.800).") in opt
    assert ("  - task accuracy of the predictor against dense, MLP and attention sparse (flag --acc-within 0.02; "
            "accuracies in the table): too noisy to read at every budget on lastword_mc (standard error of the "
            "difference 0.099 > 0.02; paired where per-document scores were stored, else unpaired).") in llama


def test_rows_keeping_whole_key_value_groups_are_a_budget_of_their_own():
    from scripts.report.inputs import row_budget
    row = {"mode": "oracle", "block": "att", "mlp_topk": "dense", "att_topk": "0.5"}
    heads = row_budget({**row, "att_kept": "2", "att_unit": "heads"})
    groups = row_budget({**row, "att_kept": "2", "att_unit": "groups"})  # att_kept counts heads for groups too
    assert heads != groups and (heads.panel, groups.panel) == ("att", "att groups")
    dims = {"num_heads": 4, "num_kv_heads": 2}
    assert (heads.text(dims), groups.text(dims)) == ("MLP dense, 2 of 4 heads",
                                                     "MLP dense, 0.5 of kv groups = 1 of 2 kv groups (2 of 4 heads)")
    unpaired = row_budget({**row, "att_topk": "0.25", "att_unit": "groups"})  # no kept count: the rule, in groups
    assert unpaired.att_count(8, 4) == 2 and unpaired.text({"num_heads": 8, "num_kv_heads": 4}) == (
        "MLP dense, 0.25 of kv groups = 1 of 4 kv groups (2 of 8 heads)")


def test_a_sparse_mode_without_rows_is_listed_with_its_reason():
    from scripts.report.answer import unmeasured_modes
    from scripts.report.inputs import row_budget
    from scripts.report.summary import Cell, ModelSummary
    budget = row_budget({"mode": "oracle", "block": "mlp", "mlp_topk": "0.25", "att_topk": "dense"})
    opt = ModelSummary("opt", notes={"gate": "n/a: OPT's MLP has no gate (fc1 -> ReLU -> fc2)"})
    llama = ModelSummary("llama")
    for summary, modes in ((opt, ("oracle", "predictor")), (llama, ("oracle", "predictor", "gate"))):
        summary.ppl = {("c4", mode, budget): Cell(None) for mode in modes}
    assert unmeasured_modes([opt, llama]) == {"random": "no perplexity-sweep row for opt, llama",
                                              "static": "no perplexity-sweep row for opt, llama",
                                              "gate": "opt: n/a: OPT's MLP has no gate"}


def test_a_comparison_noisier_than_its_flag_is_too_noisy_to_read():
    from Decentralized_FM_alpha.utils.intervals import Interval
    from scripts.report.answer import Flags, TaskResult, accuracy_clause, ratio_clause
    from scripts.report.summary import Cell
    wide = Cell(Interval(1.05, 0.70, 1.45, 10))  # standard error of the log: ln(1.45 / 0.70) / 3.92 = 0.186
    assert ratio_clause(wide, Flags(within=0.1)) == ("too noisy to read (ratio 1.050 [0.700, 1.450], standard error "
                                                     "of its log 0.186 > 0.1)")
    assert ratio_clause(wide, Flags(within=0.3)) == "within 30% (ratio 1.050 [0.700, 1.450])"
    far = Cell(Interval(2.0, 1.5, 2.7, 10))  # a wide interval far beyond the band still reads
    assert ratio_clause(far, Flags(within=0.1)) == "100% above (ratio 2.000 [1.500, 2.700])"
    # accuracy: noise decides only where the difference's interval reaches into the band of the flag
    assert accuracy_clause(TaskResult(0.575, 0.035), TaskResult(0.925, 0.019), Flags()) == (
        "0.350 below (0.575 vs 0.925, unpaired standard error 0.040)")
    assert accuracy_clause(TaskResult(0.90, 0.021), TaskResult(0.925, 0.019), Flags()) == (
        "too noisy to read (0.900 vs 0.925, unpaired standard error of the difference 0.028 > 0.02)")
    same = {"doc_ids": [0, 1, 2, 3]}  # paired over the same documents: the per-document differences' spread
    paired = accuracy_clause(TaskResult(0.5, 0.29, {**same, "acc": [1, 0, 1, 0]}),
                             TaskResult(0.75, 0.25, {**same, "acc": [1, 1, 1, 0]}), Flags())
    assert paired == "too noisy to read (0.500 vs 0.750, paired standard error of the difference 0.250 > 0.02)"


def test_every_figure_draws_a_mode_in_its_one_style(presented, monkeypatch, tmp_path):
    """The same mode looks the same in the perplexity and task figures of every model, and as series_style says;
    every figure of the report has at most four panels."""
    from matplotlib.colors import to_hex
    from scripts.analysis.common import MAX_PANELS, new_figure, series_style
    from scripts.report import baselines, figures as paper, plots
    figures = {}

    def keep(fig, path):
        figures[path.name] = fig
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")  # the gallery lists the files present
        return path
    for module in (plots, paper, baselines):
        monkeypatch.setattr(module, "save_figure", keep)
    report.build_report(presented[1], tmp_path / "report")
    assert figures and all(len([ax for ax in fig.axes if ax.has_data()]) <= MAX_PANELS for fig in figures.values())

    def style(line) -> tuple:
        return to_hex(line.get_color()), line.get_linestyle(), line.get_marker()
    _, (reference,) = new_figure()
    expected = {mode: style(reference.plot([0, 1], [0, 1], **series_style(mode))[0]) for mode in MODES}
    seen = defaultdict(set)
    shown = [name for name in figures if name.startswith(("F3_perplexity_", "F3_tasks_"))]
    assert len(shown) == 4  # two models, perplexity and task mean each
    for name in shown:
        for ax in figures[name].axes:
            for line in ax.get_lines():
                if line.get_label() in MODES:
                    seen[line.get_label()].add((name, style(line)))
            assert len(ax.get_lines()) <= 9  # the modes, dense, and two rule or chance lines per panel
    for mode in MODES:
        assert {s for _, s in seen[mode]} == {expected[mode]}, mode
        assert any(name.startswith("F3_perplexity_") for name, _ in seen[mode]), mode


def test_pooled_numbers_leave_out_layer_0_and_every_input_pools_the_same_layers(presented, twin_results):
    out, _, text = presented
    root, results = twin_results
    row = next(r for r in csv.DictReader(open(out / "report" / "summary.csv")) if r["model"] == "opt-twin")
    for key in ("mlp Recall@K 0.25 lookahead", "mlp Recall@K 0.25 l-2", "mlp penalty 0.25 same - l-1",
                "att Recall@K 0.5 same", "arch Recall lookahead"):
        assert row[f"{key} layers"] == "2", key  # 3 layers: l-2 exists from layer 2 on
    records = json.loads((results["opt"][1] / "recall_summary.json").read_text())["records"]
    layer2 = [r["Recall@K"] for r in records if (r["block"], r["input"], r["label"], r["k"], r["layer"])
              == ("mlp", "lookahead", "topk", 0.25, 2)]
    assert float(row["mlp Recall@K 0.25 lookahead"]) == pytest.approx(np.mean(layer2))
    drift_json = json.loads((results["opt"][1] / "drift.json").read_text())
    means = [r["mean"] for r in drift_json["records"] if (r["kind"], r["k"], r["space"], r["dims"])
             == ("att_x", 1, "raw", "all") and r["layer"] >= 1]
    assert row["drift same-token raw all layers"] == "1"
    assert float(row["drift same-token raw all"]) == pytest.approx(np.mean(means), abs=1e-6)
    assert "| drift pairs (l, l+1) pooled | 1 | 1 |" in sections(text)["Answer"]


def test_sections_without_input_are_listed_once_at_the_end(presented, tmp_path):
    _, inputs, _ = presented
    text = report.read_report(report.build_report([inputs[3]], tmp_path / "report"))  # the sweep alone
    titles = list(sections(text))
    assert "Residual-stream drift" not in titles and "Decomposition" not in titles
    assert text.count("Residual-stream drift") == 1
    not_measured = sections(text)["Not measured in this run"]
    assert "- section 'Residual-stream drift': no input of this kind was given" in not_measured
    assert "- Answer: task accuracy at the budgets (no task-sweep CSV)" in not_measured
    assert titles.index("Not measured in this run") > titles.index("Perplexity sweep")


def test_drift_figure_starts_at_layer_1_and_gives_layer_0_in_the_legend(twin_results, monkeypatch, tmp_path):
    from scripts.report import plots
    _, results = twin_results
    payload = json.loads((results["opt"][1] / "drift.json").read_text())
    figures = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: figures.append(fig) or path)
    plots.plot_drift([payload], {"opt-twin": "#1f77b4"}, tmp_path)
    layer0 = {r["space"]: r["mean"] for r in payload["records"] if (r["kind"], r["layer"], r["k"], r["dims"])
              == ("att_x", 0, 1, "all")}
    raw, normed = figures[0].axes[:2]
    for ax, space in ((raw, "raw"), (normed, "normed")):
        assert ax.get_lines() and all(min(line.get_xdata()) >= 1 for line in ax.get_lines())
        legend = [text.get_text() for text in ax.get_legend().get_texts()]
        assert f"opt-twin same-token (layer 0: {layer0[space]:.3f})" in legend
        assert space in ax.get_title()


@pytest.fixture(scope="module")
def with_baselines(twin_results, tmp_path_factory):
    """The twins' results in the baselines' format: a static ranking with half the lookahead predictor's hits, the
    gate (|SiLU(g)|) on Llama only (OPT's records say n/a), and drift with cross-token cosines of half the
    same-token ones."""
    root, results = twin_results
    out = tmp_path_factory.mktemp("baselines")
    for family in ("opt", "llama"):
        recall = json.loads((results[family][1] / "recall_summary.json").read_text())
        recall["records"] = [r for r in recall["records"] if "ranking" not in r]  # the predictors only
        first_seed = min(r["seed"] for r in recall["records"])
        extra = []
        for r in recall["records"]:
            if (r["input"], r["label"], r["seed"]) == ("lookahead", "topk", first_seed):
                static = {**r["per_document"], "topk_hits": [h // 2 for h in r["per_document"]["topk_hits"]]}
                extra.append({**r, "input": "static (no predictor)", "ranking": "static", "seed": None,
                              "per_document": static})
                if r["block"] == "mlp":
                    extra.append({**r, "input": "gate (no predictor)", "ranking": "|SiLU(g)|", "seed": None}
                                 if family == "llama" else
                                 {"model": r["model"], "block": "mlp", "layer": r["layer"], "input": "gate",
                                  "ranking": "|SiLU(g)|", "label": "topk", "k": r["k"], "K": r["K"],
                                  "Recall@K": None, "n/a": "n/a: OPT's MLP has no gate (fc1 -> ReLU -> fc2)"})
        recall["records"] += extra
        drift_payload = json.loads((results[family][1] / "drift.json").read_text())
        for x in drift_payload["k1_intervals"]:
            half = {key: x[key] / 2 for key in ("value", "low", "high")}
            x["cross_token"] = {**x, **half}
            x["same_minus_cross"] = {**x, **half}
        for r in drift_payload["records"]:
            r["cross_token_mean"] = r["mean"] / 2
        (out / family).mkdir()
        (out / family / "recall_summary.json").write_text(json.dumps(recall))
        (out / family / "drift.json").write_text(json.dumps(drift_payload))
    text = report.read_report(report.build_report([results["opt"][0], results["llama"][0], out], out / "report"))
    return out, text


def test_the_answer_sets_the_predictor_beside_the_static_and_gate_rankings_and_drift_beside_cross_token(
        with_baselines):
    out, text = with_baselines
    answer = sections(text)["Answer"]
    records = json.loads((out / "opt" / "recall_summary.json").read_text())["records"]
    static = [r for r in records if r.get("ranking") == "static" and (r["block"], r["k"], r["layer"])
              == ("mlp", 0.25, 2)]
    expected = sum(sum(r["per_document"]["topk_hits"]) for r in static) / sum(
        r["K"] * sum(r["per_document"]["tokens"]) for r in static)
    row = next(line for line in answer.splitlines() if line.startswith("| MLP K=0.25 | static |"))
    assert row.split(" | ")[2].startswith(f"{expected:.3f} [")
    assert "| MLP K=0.25 | gate | n/a: OPT's MLP has no gate |" in answer  # Llama's gate beside it
    drift_payload = json.loads((out / "opt" / "drift.json").read_text())
    [raw] = [x for x in drift_payload["k1_intervals"] if (x["kind"], x["space"], x["dims"]) == ("att_x", "raw", "all")]
    assert f"| cross-token cosine at k=1 (raw) | {raw['cross_token']['value']:.3f} [" in answer
    assert (f"drift at k=1 (raw): the same-token cosine exceeds the cross-token one by "
            f"{raw['same_minus_cross']['value']:.3f}") in answer
    predictor = [r for r in records if (r.get("ranking"), r["block"], r["input"], r["label"], r["k"], r["layer"])
                 == (None, "mlp", "lookahead", "topk", 0.25, 2)]
    mean = np.mean([r["Recall@K"] for r in predictor])
    assert (f"  - MLP Recall@K of the lookahead predictor against the static top-K: K=0.25: {mean:.3f} vs "
            f"{expected:.3f} ({mean - expected:+.3f}); K=0.5: ") in answer
    not_measured = sections(text)["Not measured in this run"]
    assert "cross-token" not in not_measured and "static top-K Recall@K" not in not_measured
    assert max(table_widths(text)) <= 10


def test_sweep_wiring_reads_the_input_the_trained_k_and_the_dense_layers_from_the_rows():
    from scripts.report.summary import sweep_wiring

    row = {"mode": "predictor", "predictor_input": "lookahead", "mlp_topk": "0.25", "att_topk": "dense",
           "mlp_trained_k": "0.25", "att_trained_k": "n/a", "dense_layers": "0"}
    dense = {"mode": "dense", "dense_layers": ""}
    assert sweep_wiring([dense, row]) == ("predictor input lookahead, top-K label trained at each row's budget; "
                                          "layers kept dense in every sparse mode: 0")
    other = {**row, "mlp_trained_k": "0.5", "predictor_input": "same"}
    assert sweep_wiring([row, other]).startswith("predictor input lookahead, same, 1 predictor(s) trained for another K")
    assert "not recorded" in sweep_wiring([{"mode": "oracle", "mlp_topk": "0.25"}])

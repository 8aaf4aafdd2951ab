"""Perplexity of DejaVu's sparse simulation over modes, blocks and budgets, next to the dense baseline, in one table.

For each request file (C4 validation, WikiText-2 windows, ...) scores the dense model once and then every setting
with the `*-ml-att-sparse` model type, through dist_inference_runner (one process, world size 1; the sparse model
is loaded once and each setting gets its own sparsity controller). Settings decompose the cost by block:
  mlp   MLP budget only, attention dense        att   attention budget only, MLP dense
  both  the i-th MLP budget with the i-th attention budget
for every mode (oracle, predictor, random, static, gate: gate ranks MLP neurons only and needs a gated MLP, so it
runs on `mlp` rows of Llama-family models; structured, the MLP's own form at low rank, on `mlp` rows, read like
`predictor` from --predictor-dir's structured_mlp_layer{L} files), and with `--att-units groups` the `att` rows again in whole key/value
groups (Llama with GQA). Budgets are counts or fractions (< 1) of each block's units, turned into counts
by the one count rule. Layers of --dense-layers (layer 0 by default) stay dense in every mode.

Predictors and static rankings are made per budget (SPEC §7): `--predictor-dir` may hold `{k}`, replaced by each
block's budget as written (e.g. predictors/b{k} -> predictors/b0.25), and `--group-predictor-dir` does the same for
the group rows. The runner refuses a predictor trained for another K or input (--allow-predictor-mismatch).

Writes <out-dir>/sweep.csv and sweep.md, one row per (dataset, setting): model, dataset, mode, block, mlp_topk,
att_topk, mlp_kept, att_kept, att_unit, predictor_input, mlp_trained_k, att_trained_k, dense_layers, perplexity,
tokens, the on-policy Recall@K of each sparse block (mean over its sparse layers, and per layer as `layer:recall`:
the applied masks against the true top-K of the same run, over real tokens; the runner's manifest holds the counts),
output_manifest. A setting whose output manifest already holds a perplexity is not run again.
sweep.manifest.json's rows add `extra_work`: what ranking the units costs per token and sparse layer in the setting's
mode (weights read, FLOPs, bytes at --dtype; Decentralized_FM_alpha/utils/mode_cost.py), per block, so that modes can
be compared at equal cost.

  python scripts/study/sparse_sweep.py --model-name pretrained_models/llama-3.2-3b --family llama \\
      --predictor-dir data/llama-3.2-3b_sparse_predictors/b{k} --data c4=Decentralized_FM_alpha/c4_val/c4_valid.jsonl \\
      --data wikitext2=data/wikitext2_requests.jsonl --mlp-topk 0.1 0.25 0.5 --att-topk 0.1 0.25 0.5 --out-dir out/sweep
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tqdm import tqdm  # noqa: E402

from Decentralized_FM_alpha import dist_inference_runner  # noqa: E402
from Decentralized_FM_alpha.modules.sparsity import (DEFAULT_DENSE_LAYERS, FILE_MODES, MLP_ONLY_MODES,  # noqa: E402
                                                     MODES, parse_budget)
from Decentralized_FM_alpha.utils import mode_cost  # noqa: E402
from Decentralized_FM_alpha.utils.manifest import base_manifest, weights_provenance, write_json_atomic  # noqa: E402
from scripts.analysis.common import write_csv_atomic  # noqa: E402
from sparse_predictor.trainer.labels import k_name  # noqa: E402

COLUMNS = ("model", "dataset", "mode", "block", "mlp_topk", "att_topk", "mlp_kept", "att_kept", "att_unit",
           "predictor_input", "mlp_trained_k", "att_trained_k", "dense_layers", "perplexity", "tokens",
           "mlp_on_policy_recall", "att_on_policy_recall", "mlp_on_policy_recall_layers", "att_on_policy_recall_layers",
           "output_manifest")
BLOCKS = ("mlp", "att", "both")
ATT_UNITS = ("heads", "groups")
SPARSE_MODES = tuple(m for m in MODES if m != "dense")
ATT_FILE_MODES = tuple(m for m in FILE_MODES if m not in MLP_ONLY_MODES)  # read attention files too
NOT_APPLICABLE = "n/a"


@dataclass(frozen=True)
class Setting:
    """One row's model: the mode, which blocks are sparse and at what budget (as written), heads or groups, and in
    which layers (the runner's --sparse-layers; None: every layer outside --dense-layers)."""
    mode: str
    block: str  # none (the dense baseline), mlp, att or both
    mlp: str | None = None
    att: str | None = None
    unit: str = "heads"
    layers: str | None = None

    @property
    def name(self) -> str:
        """The setting in file and folder names, e.g. oracle_mlp0.25_att0.25, static_att0.5_groups or
        predictor_mlp0.5_layers3."""
        return (self.mode + (f"_mlp{self.mlp}" if self.mlp else "") + (f"_att{self.att}" if self.att else "")
                + ("_groups" if self.unit == "groups" else "") + (f"_layers{self.layers}" if self.layers else ""))


DENSE = Setting("dense", "none")


def plan_settings(modes: list[str], mlp: list[str], att: list[str], blocks: list[str], units: list[str],
                  gated: bool) -> list[Setting]:
    """The dense baseline, then for each mode every block's rows (group rows after the head rows)."""
    for budget in mlp + att:
        parse_budget(budget)  # fail before any run
    if "both" in blocks and len(mlp) != len(att):
        raise SystemExit(f"--blocks both pairs the i-th --mlp-topk with the i-th --att-topk: give the same number "
                         f"({len(mlp)} vs {len(att)})")
    settings = [DENSE]
    for mode in modes:
        for block in blocks:
            if mode in MLP_ONLY_MODES and block != "mlp" or mode == "gate" and not gated:
                continue  # gate and structured rank MLP neurons only; gate needs a gated MLP
            for unit in (units if block == "att" else ["heads"]):  # group rows: attention alone
                if block == "mlp":
                    settings += [Setting(mode, block, mlp=b) for b in mlp]
                elif block == "att":
                    settings += [Setting(mode, block, att=b, unit=unit) for b in att]
                else:
                    settings += [Setting(mode, block, m, a, unit) for m, a in zip(mlp, att)]
    return settings


def predictor_dir(template: str | None, setting: Setting) -> str | None:
    """The folder of the setting's predictor (or static) files: {k} is each sparse block's budget as written, so a
    paired row needs both budgets equal when the template holds {k}."""
    if template is None or "{k}" not in template:
        return template
    budgets = {budget_name(b) for b in (setting.mlp, setting.att) if b is not None}
    if len(budgets) != 1:
        raise SystemExit(f"--predictor-dir {template}: the paired row mlp {setting.mlp} / att {setting.att} would read "
                         f"two folders; pair equal budgets, or give a folder without {{k}}")
    return template.format(k=budgets.pop())


def file_dir_template(args: argparse.Namespace, setting: Setting) -> str | None:
    """The folder template of a file mode's setting: --structured-dir for structured (default --predictor-dir),
    --group-predictor-dir for group rows, else --predictor-dir."""
    if setting.mode == "structured":
        return args.structured_dir or args.predictor_dir
    return args.group_predictor_dir if setting.unit == "groups" else args.predictor_dir


def budget_name(budget: str) -> str:
    """A budget as folder names write it: a fraction as the trainer names its --k folders (0.10 -> 0.1), a count as is."""
    value = parse_budget(budget)
    return k_name(value) if isinstance(value, float) else str(value)


def parse_data(items: list[str]) -> dict[str, Path]:
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name:
            raise SystemExit(f"--data takes NAME=PATH, got {item!r}")
        if not Path(path).is_file():
            raise SystemExit(f"--data {name}: request file not found: {path}")
        out[name] = Path(path)
    return out


def setting_argv(args: argparse.Namespace, setting: Setting) -> list[str]:
    """The runner flags of a setting's model (the request file and output are added per run)."""
    argv = ["--model-name", args.model_name, "--dtype", args.dtype, "--use-cuda", args.use_cuda, "--seed",
            str(args.seed), "--token-micro-batch-size", str(args.batch)]
    argv += ["--max-seq-len", str(args.max_seq_len)] if args.max_seq_len else []
    argv += ["--num-iters", str(args.num_iters)] if args.num_iters else []
    if setting.mode == "dense":
        return argv + ["--model-type", args.family]
    argv += ["--model-type", f"{args.family}-ml-att-sparse", "--sparse-mode", setting.mode,
             "--dense-layers", args.dense_layers, "--predictor-input", args.predictor_input]
    argv += (["--mlp-topk", setting.mlp] if setting.mlp else []) + (["--att-topk", setting.att] if setting.att else [])
    argv += ["--sparse-layers", setting.layers] if setting.layers else []
    if setting.mode in FILE_MODES:
        argv += ["--predictor-dir", predictor_dir(file_dir_template(args, setting), setting)]
    argv += ["--gqa-groups"] if setting.unit == "groups" else []
    argv += ["--allow-predictor-mismatch"] if args.allow_predictor_mismatch else []
    return argv


class Runner:
    """Scores settings on one loaded model at a time: consecutive settings of one model type share it, each sparse
    setting with its own sparsity controller (the same numbers as a fresh runner process per setting)."""

    def __init__(self):
        self.key, self.pipe = None, None

    def score(self, argv: list[str]) -> None:
        args = dist_inference_runner.resolve_args(argv)
        key = (args.model_name, args.model_type, args.dtype, args.use_cuda, args.max_seq_len, args.seed,
               args.token_micro_batch_size, args.budget)
        if key != self.key:
            self.close()
            self.key, self.pipe = key, dist_inference_runner.build_pipeline(args)
        elif args.model_type.endswith("-ml-att-sparse"):
            dist_inference_runner.attach_sparsity(args, self.pipe)
        dist_inference_runner.score(args, self.pipe)

    def close(self) -> None:
        if self.pipe is not None:
            self.pipe.comm.close()
            self.key, self.pipe = None, None


def describe_row(args: argparse.Namespace, dataset: str, setting: Setting, manifest_path: Path) -> dict:
    """A setting's table row from its run manifest (the full on-policy counts stay under the row's
    `on_policy_recall`, which the manifest keeps and the CSV leaves out)."""
    manifest = json.loads(manifest_path.read_text())
    sparsity = manifest.get("sparsity", {})
    recall = sparsity.get("on_policy_recall", {})  # absent for a dense run (and runs made before it was counted)

    def one(values) -> str:
        values = sorted(set(values))
        return NOT_APPLICABLE if not values else " ".join(str(v) for v in values)

    def trained(block: str) -> str:
        return one(p["k"] for p in sparsity.get("predictors", []) if p["block"] == block and p.get("k") is not None)

    return {"model": Path(args.model_name).name, "dataset": dataset, "mode": setting.mode, "block": setting.block,
            "mlp_topk": setting.mlp or "dense", "att_topk": setting.att or "dense",
            "mlp_kept": one(sparsity.get("mlp_kept", {}).values()), "att_kept": one(sparsity.get("att_kept", {}).values()),
            "att_unit": setting.unit if setting.att else NOT_APPLICABLE,
            "predictor_input": sparsity.get("predictor_input") or NOT_APPLICABLE,
            "mlp_trained_k": trained("mlp"), "att_trained_k": trained("att"),
            "dense_layers": " ".join(map(str, sparsity.get("dense_layers", []))) or
                            ("none" if sparsity else NOT_APPLICABLE),
            "perplexity": manifest["perplexity"]["perplexity"], "tokens": manifest["perplexity"]["tokens"],
            **{f"{block}_on_policy_recall": recall.get("mean", {}).get(block, NOT_APPLICABLE) for block in ("mlp", "att")},
            **{f"{block}_on_policy_recall_layers": layer_recalls(recall, block) for block in ("mlp", "att")},
            "on_policy_recall": recall.get("layers", []), "output_manifest": str(manifest_path),
            "extra_work": extra_work(args, sparsity)}


def layer_recalls(recall: dict, block: str) -> str:
    """A block's per-layer on-policy Recall@K as `layer:recall` pairs, e.g. '1:0.8125 2:0.7031'."""
    pairs = [f"{r['layer']}:{r['recall']:.4f}" for r in recall.get("layers", [])
             if r["block"] == block and r["recall"] is not None]
    return " ".join(pairs) or NOT_APPLICABLE



def extra_work(args: argparse.Namespace, sparsity: dict) -> dict:
    """Per sparse block, what ranking its units costs per token (mode_cost.py): per sparse layer (the mean over the
    layers) and summed over them, from the shapes of the files the run loaded."""
    shape = mode_cost.BlockShape.of_config(json.loads((Path(args.model_name) / "config.json").read_text()))
    mode, out = sparsity.get("mode", "dense"), {}
    for block in ("mlp", "att"):
        layers = [int(layer) for layer in sparsity.get(f"{block}_kept", {})]
        if not layers:
            continue
        files = {p["layer"]: p["path"] for p in sparsity.get("predictors", []) if p["block"] == block}
        shapes = [predictor_shape(files.get(layer)) for layer in layers]
        out[block] = {"sparse_layers": len(layers), "definition": mode_cost.DEFINITIONS[mode]}
        if mode in FILE_MODES and mode != "static" and None in shapes:
            out[block]["unknown"] = "a loaded predictor's JSON records no `predictor` shape"
            continue
        weights = [mode_cost.ranking_weights(mode, block, shape, s) for s in shapes]
        out[block].update(per_layer=mode_cost.work(round(sum(weights) / len(weights)), args.dtype),
                          all_layers=mode_cost.work(sum(weights), args.dtype))
    return out


def predictor_shape(path: str | None) -> dict | None:
    """The `predictor` entry of a loaded predictor file's JSON (a static file has none)."""
    return None if path is None else json.loads(Path(path).with_suffix(".json").read_text()).get("predictor")


def run_setting(runner: Runner, args: argparse.Namespace, dataset: str, requests: Path, setting: Setting) -> dict:
    out = args.out_dir / f"{dataset}_{setting.name}.jsonl"
    manifest_path = Path(str(out) + ".manifest.json")
    if not (manifest_path.is_file() and "perplexity" in json.loads(manifest_path.read_text())):
        runner.score(setting_argv(args, setting) + ["--infer-data", str(requests), "--output-path", str(out)])
    return describe_row(args, dataset, setting, manifest_path)


def run_settings(args: argparse.Namespace, plan: list[tuple[str, Path, Setting]], description: str) -> dict:
    """(dataset, request file, setting) -> its row, each run or read back when finished, under one progress bar."""
    runner, rows = Runner(), {}
    try:  # dense runs first, then the sparse ones: each model is loaded once
        for item in tqdm(sorted(plan, key=lambda item: item[2].mode != "dense"), desc=description, unit="run"):
            rows[item] = run_setting(runner, args, *item)
    finally:
        runner.close()
    return rows


def write_tables(rows: list[dict], out_dir: Path) -> tuple[Path, Path]:
    csv_path, md_path = out_dir / "sweep.csv", out_dir / "sweep.md"
    write_csv_atomic(csv_path, rows, COLUMNS)
    shown = [c for c in COLUMNS if c not in ("output_manifest", "model", "mlp_on_policy_recall_layers",
                                             "att_on_policy_recall_layers")]
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(f"{r[c]:.4f}" if isinstance(r[c], float) else str(r[c]) for c in shown) + " |"
              for r in rows]
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def add_sweep_arguments(p: argparse.ArgumentParser) -> None:
    """Modes, blocks, budgets, predictor wiring and the model's compute flags, as this sweep and
    scripts/study/task_sweep.py share them."""
    p.add_argument("--modes", nargs="+", choices=SPARSE_MODES, default=["oracle", "predictor", "random", "static"],
                   help="sparse modes to run besides the dense baseline (default: oracle predictor random static; "
                        "gate ranks MLP neurons of a gated MLP by the exact gate)")
    p.add_argument("--mlp-topk", nargs="*", default=[], help="MLP budgets: counts or fractions < 1")
    p.add_argument("--att-topk", nargs="*", default=[], help="attention budgets: counts or fractions < 1 of the heads")
    p.add_argument("--blocks", nargs="+", choices=BLOCKS, default=list(BLOCKS),
                   help="rows to run: mlp (attention dense), att (MLP dense), both (the i-th budgets paired); "
                        "default all three")
    p.add_argument("--att-units", nargs="+", choices=ATT_UNITS, default=["heads"],
                   help="attention rows in query heads and/or whole key/value groups (Llama with GQA; groups rows "
                        "read --group-predictor-dir); default heads")
    p.add_argument("--group-predictor-dir", default=None,
                   help="the same as --predictor-dir for the group rows (predictors trained with main_att*.py "
                        "--gqa-groups)")
    add_wiring_arguments(p)


def add_wiring_arguments(p: argparse.ArgumentParser) -> None:
    """Where predictor and static files come from and what they must fit, the dense layers, dtype and device: the
    flags this sweep, scripts/study/task_sweep.py and scripts/study/layer_sweep.py share."""
    p.add_argument("--predictor-dir", default=None,
                   help="predictor and static files (modes predictor, static); {k} is replaced by each block's budget "
                        "as written, for per-budget predictors (e.g. predictors/b{k})")
    p.add_argument("--structured-dir", default=None,
                   help="structured_mlp_layer{L} files of mode structured (sparse_predictor/train_structured.py), {k} "
                        "as in --predictor-dir (default: --predictor-dir)")
    p.add_argument("--predictor-input", default="lookahead",
                   help="the input wiring the predictors must have been trained on (default lookahead, DejaVu's)")
    p.add_argument("--allow-predictor-mismatch", action="store_true",
                   help="run predictors made for another budget or input anyway (recorded in each manifest)")
    p.add_argument("--dense-layers", default=DEFAULT_DENSE_LAYERS,
                   help="layers kept dense in every sparse mode, or 'none' (default %(default)s)")
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp32", help="compute dtype (default fp32)")
    p.add_argument("--use-cuda", choices=("true", "false"), default="false", help="run on the GPU (default false)")


def check_sweep_arguments(args: argparse.Namespace, family: str) -> None:
    if not args.mlp_topk and not args.att_topk:
        raise SystemExit("give at least one budget (--mlp-topk and/or --att-topk)")
    need_dir = [m for m in args.modes if m in FILE_MODES and not (m == "structured" and args.structured_dir)]
    if need_dir and not args.predictor_dir:
        raise SystemExit(f"modes {need_dir} need --predictor-dir (structured: or --structured-dir)")
    if "groups" in args.att_units and any(m in ATT_FILE_MODES for m in args.modes) and not args.group_predictor_dir:
        raise SystemExit("--att-units groups with modes predictor/static needs --group-predictor-dir")
    if "groups" in args.att_units and family != "llama":
        raise SystemExit(f"--att-units groups: a {family} model has no key/value groups")


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """The model, the request files and how the runner scores them: this sweep's and layer_sweep.py's."""
    p.add_argument("--model-name", required=True, help="converted checkpoint directory")
    p.add_argument("--family", choices=("opt", "llama"), required=True, help="model family")
    p.add_argument("--data", action="append", required=True, metavar="NAME=PATH",
                   help="a request file to score (repeat): e.g. c4=c4_valid.jsonl wikitext2=wikitext2.jsonl")
    p.add_argument("--max-seq-len", type=int, default=None, help="passed to the runner")
    p.add_argument("--num-iters", type=int, default=None, help="score only the first N requests of each file")
    p.add_argument("--batch", type=int, default=8, help="--token-micro-batch-size of the runner (default 8)")
    p.add_argument("--seed", type=int, default=42, help="seed of the random mode (default 42)")
    p.add_argument("--out-dir", type=Path, required=True, help="outputs, their manifests and the tables")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(p)
    add_sweep_arguments(p)
    args = p.parse_args(argv)
    check_sweep_arguments(args, args.family)
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    data = parse_data(args.data)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    settings = plan_settings(args.modes, args.mlp_topk, args.att_topk, args.blocks, args.att_units,
                             gated=args.family == "llama")
    plan = [(name, path, s) for name, path in data.items() for s in settings]
    rows = run_settings(args, plan, "sweep settings")
    rows = [rows[item] for item in plan]
    csv_path, md_path = write_tables(rows, args.out_dir)
    write_json_atomic(args.out_dir / "sweep.manifest.json",
                      base_manifest(arguments={k: str(v) for k, v in vars(args).items()}, rows=rows, table=str(csv_path),
                                    weights=weights_provenance(args.model_name),
                                    skipped=[] if args.family == "llama" or "gate" not in args.modes else
                                    ["gate: an OPT MLP has no gate (n/a)"]))
    print(f"wrote {len(rows)} settings -> {csv_path} and {md_path}")
    return rows


if __name__ == "__main__":
    main()

"""Downstream accuracy of DejaVu's sparse simulation with lm-evaluation-harness: tasks x modes x budgets, one table.

For every setting (the dense baseline, then each mode x block x budget, as scripts/study/sparse_sweep.py plans them:
mlp, att and paired rows, per-budget predictors through --predictor-dir with {k}) evaluates every task of --tasks
with the harness model `dejavu` (Decentralized_FM_alpha/lm_eval_model.py: the runner's model and sparse modules),
one call per task; the model is loaded once per model type and each sparse setting gets its own controller. Each (setting, task) writes
<out-dir>/runs/<setting>/<task>.json (the harness's metrics and sample counts, the model's sparsity and weights, the
wall time, a manifest); a rerun skips the pairs whose JSON exists, so an interrupted sweep resumes (a JSON made with
other settings - limit, shots, seed, dtype, ... - is an error, not a silent mix). Then writes <out-dir>/tasks.csv
and tasks.md, one row per (mode, budget, task) with the harness's acc / acc_norm and their standard errors, and
tasks.manifest.json. With --shard I/N a process evaluates every N-th setting only and writes no table; N of them
share one GPU (a small model leaves it idle between batches), and a run without --shard then writes the table from
their results.

Default tasks: the seven of DejaVu's accuracy table, by their harness names (they download from the hub). Offline,
write the local tasks (scripts/assets/make_local_task.py: the same seven over the bundled splits, dejavu_cb, ...,
dejavu_lambada_openai, and the WikiText-2 test task) and give their folder to --include-path; its data files are
checked against their checksums before any evaluation:
    python scripts/assets/make_local_task.py --out-dir out/lm_eval_tasks
    python scripts/study/task_sweep.py --model-name pretrained_models/tiny-llama-converted --include-path out/lm_eval_tasks \\
        --tasks dejavu_cb,dejavu_copa,dejavu_rte,dejavu_winogrande,dejavu_piqa,dejavu_openbookqa,dejavu_lambada_openai \\
        --modes oracle random \\
        --mlp-topk 0.1 0.25 0.5 --att-topk 2 4 6 --limit 100 --out-dir out/tasks_tiny
    python scripts/study/task_sweep.py --model-name pretrained_models/llama-3.2-3b --dtype bf16 --use-cuda true --batch 32 \\
        --predictor-dir data/llama-3.2-3b_sparse_predictors/b{k} --mlp-topk 0.25 0.5 --att-topk 0.25 0.5 \
        --out-dir out/tasks_3b
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tqdm import tqdm  # noqa: E402

from Decentralized_FM_alpha.utils.manifest import (base_manifest, read_json, weights_provenance,  # noqa: E402
                                                   write_json_atomic)
from Decentralized_FM_alpha.utils.model_source import family_of_checkpoint  # noqa: E402
from scripts.analysis.common import write_csv_atomic  # noqa: E402
from scripts.assets.dejavu_tasks import verify_task_folder  # noqa: E402
from scripts.study.sparse_sweep import (FILE_MODES, NOT_APPLICABLE, Setting, add_sweep_arguments,  # noqa: E402
                                       check_sweep_arguments, file_dir_template, plan_settings, predictor_dir)

DEJAVU_TASKS = "cb,copa,lambada_openai,openbookqa,piqa,rte,winogrande"
METRICS = ("acc", "acc_norm")
SETTING_COLUMNS = ("mode", "block", "mlp_topk", "att_topk", "mlp_kept", "att_kept", "att_unit", "predictor_input",
                   "mlp_trained_k", "att_trained_k", "dense_layers")
COLUMNS = ("model", "task", *SETTING_COLUMNS, "acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "other_metrics",
           "samples", "num_fewshot", "seconds", "result_json")


def model_args(args, setting: Setting) -> dict:
    """The dejavu model's arguments for one setting: the runner's flags (SPEC section 8)."""
    found = {"pretrained": args.model_name, "dtype": args.dtype, "seed": args.seed, "batch_size": args.batch,
             "device": "cuda" if args.use_cuda == "true" else "cpu"}
    if args.max_seq_len:
        found["max_seq_len"] = args.max_seq_len
    if setting.mode != "dense":
        found.update(sparse_mode=setting.mode, gqa_groups=setting.unit == "groups", dense_layers=args.dense_layers,
                     predictor_input=args.predictor_input, allow_predictor_mismatch=args.allow_predictor_mismatch)
        found.update({k: v for k, v in (("mlp_topk", setting.mlp), ("att_topk", setting.att),
                                         ("sparse_layers", args.sparse_layers),
                                         ("predictor_dir", predictor_dir(file_dir_template(args, setting), setting)
                                          if setting.mode in FILE_MODES else None))
                      if v is not None})
    return found


def identity(args, task: str, setting: Setting) -> dict:
    """What a finished (setting, task) result must have been made with for a rerun to reuse it."""
    return {"task": task, "mode": setting.mode, "block": setting.block, "mlp_topk": setting.mlp,
            "att_topk": setting.att, "att_unit": setting.unit, "limit": args.limit, "num_fewshot": args.num_fewshot,
            "fewshot_seed": args.fewshot_seed, "bootstrap_iters": args.bootstrap_iters,
            "model_args": {k: str(v) for k, v in model_args(args, setting).items()}}


def reusable(path: Path, wanted: dict) -> bool:
    if not path.is_file():
        return False
    found = read_json(path)["identity"]
    differing = sorted(k for k in set(found) | set(wanted) if found.get(k) != wanted.get(k))
    if differing:
        raise SystemExit(f"{path} was made with other settings ({', '.join(differing)}: "
                         f"{[found.get(k) for k in differing]} vs now {[wanted.get(k) for k in differing]}); "
                         f"use another --out-dir or delete it")
    return True


def task_manager(include_path: list[str], tasks: list[str]):
    """Only the given folders when they hold every task (indexing the harness's own thousands of tasks takes
    seconds), else those folders and the harness's tasks."""
    from lm_eval.tasks import TaskManager

    if include_path:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if set(tasks) <= set(local.all_tasks):
            return local
    return TaskManager(include_path=include_path or None)


def evaluate_task(args, lm, manager, task: str) -> dict:
    """One task through the harness's evaluate(), set up as its simple_evaluate() does (seeds, few-shot count and
    sampler seed) but without the environment report it appends (a pip subprocess: seconds per call)."""
    import random

    import numpy as np
    import torch
    from lm_eval.defaults import DEFAULT_OTHER_SEED, DEFAULT_RANDOM_SEED
    from lm_eval.evaluator import evaluate

    started = time.time()
    random.seed(DEFAULT_RANDOM_SEED)
    np.random.seed(DEFAULT_OTHER_SEED)
    torch.manual_seed(DEFAULT_OTHER_SEED)
    loaded = manager.load([task])
    for task_obj in loaded["tasks"].values():
        if args.num_fewshot is not None and task_obj.get_config("num_fewshot") != 0:
            task_obj.set_config(key="num_fewshot", value=args.num_fewshot)
        elif task_obj.get_config("num_fewshot") is None:
            task_obj.set_config(key="num_fewshot", value=0)
        task_obj.set_fewshot_seed(seed=args.fewshot_seed)
    out = evaluate(lm=lm, task_dict=loaded, limit=args.limit, bootstrap_iters=args.bootstrap_iters, log_samples=True)
    return {"results": out["results"], "n-samples": out["n-samples"], "n-shot": out.get("n-shot", {}),
            "versions": out.get("versions", {}), "higher_is_better": out.get("higher_is_better", {}),
            "per_example": per_example_accuracy(out.get("samples", {})),
            "harness": harness_version(), "seconds": time.time() - started}


def per_example_accuracy(samples: dict) -> dict[str, dict[str, list]]:
    """task -> the doc ids and each document's acc (1 correct, 0 not), in doc order: a difference between two settings
    on the same documents gets its paired standard error from these (scripts/report/headline.py)."""
    found = {}
    for task, rows in samples.items():
        scored = sorted((row["doc_id"], float(row["acc"])) for row in rows if "acc" in row)
        if scored:
            found[task] = {"doc_ids": [d for d, _ in scored], "acc": [a for _, a in scored]}
    return found


def harness_version() -> str:
    import importlib.metadata

    return importlib.metadata.version("lm_eval")


class Models:
    """One harness model loaded once for every setting: the sparse model type, each setting with its own controller
    (DejaVuLM.use_sparsity). The dense setting runs as its mode `dense`, which keeps every unit on the same code path
    as the dense modules (the same operations, so the same numbers) and spares a second load of the weights."""

    def __init__(self):
        self.lm = None

    def get(self, arguments: dict):
        from Decentralized_FM_alpha.lm_eval_model import DejaVuLM

        arguments = {"sparse_mode": "dense", **arguments}
        if self.lm is None:
            gc.collect()
            self.lm = DejaVuLM(**arguments)
        else:
            self.lm.use_sparsity(**arguments)
        return self.lm


def result_path(args, setting: Setting, task: str) -> Path:
    return args.out_dir / "runs" / setting.name / f"{task}.json"


def finished(args, setting: Setting, task: str) -> bool:
    """The (setting, task) result exists and was made with these settings (one made with others is an error)."""
    return reusable(result_path(args, setting, task), identity(args, task, setting))


def run_setting(args, manager, models: Models, setting: Setting, progress) -> list[Path]:
    """Every task of one setting; the model is built only when some task has no result yet."""
    paths = {task: result_path(args, setting, task) for task in args.tasks}
    todo = [t for t in args.tasks if not finished(args, setting, t)]
    progress.update(len(args.tasks) - len(todo))
    if todo:
        paths[todo[0]].parent.mkdir(parents=True, exist_ok=True)
        lm = models.get(model_args(args, setting))
        for task in todo:
            result = evaluate_task(args, lm, manager, task)
            write_json_atomic(paths[task], {**base_manifest(kind="task_result"), **result,
                                            "identity": identity(args, task, setting),
                                            "model_info": lm.get_model_info()})
            progress.update(1)
    return [paths[t] for t in args.tasks]


def rows_of(path: Path, model: str, out_dir: Path) -> list[dict]:
    """One row per task (or group) in a result JSON: acc / acc_norm and their standard errors, other metrics; the
    JSON's path relative to out_dir, where the table is written, so that the folder can move with its table."""
    result = read_json(path)
    rows = []
    for name, metrics in result["results"].items():
        values = {key.partition(",")[0]: v for key, v in metrics.items() if key.endswith(",none")}
        row = {"model": model, "task": name, **setting_columns(result),
               "samples": result["n-samples"].get(name, {}).get("effective"),
               "num_fewshot": result["n-shot"].get(name), "seconds": result["seconds"],
               "result_json": str(path.relative_to(out_dir))}
        for metric in METRICS:  # the harness writes "N/A" for a standard error it did not compute: left empty
            row[metric], row[f"{metric}_stderr"] = (v if isinstance(v, (int, float)) else None for v in
                                                    (values.get(metric), values.get(f"{metric}_stderr")))
        row["other_metrics"] = "; ".join(f"{k}={v:.6g}" for k, v in values.items()
                                         if k.removesuffix("_stderr") not in METRICS and isinstance(v, (int, float)))
        rows.append(row)
    return rows


def setting_columns(result: dict) -> dict:
    """The setting of a result JSON as sweep.csv describes it (budgets as written, counts kept, predictor wiring)."""
    setting = result["identity"]
    sparsity = (result["model_info"]["dejavu"]["sparsity"] or {}) if setting["mode"] != "dense" else {}

    def one(values) -> str:
        values = sorted(set(values))
        return NOT_APPLICABLE if not values else " ".join(str(v) for v in values)

    def trained(block: str) -> str:
        return one(p["k"] for p in sparsity.get("predictors", []) if p["block"] == block and p.get("k") is not None)

    return {"mode": setting["mode"], "block": setting["block"], "mlp_topk": setting["mlp_topk"] or "dense",
            "att_topk": setting["att_topk"] or "dense", "mlp_kept": one(sparsity.get("mlp_kept", {}).values()),
            "att_kept": one(sparsity.get("att_kept", {}).values()),
            "att_unit": setting["att_unit"] if setting["att_topk"] else NOT_APPLICABLE,
            "predictor_input": sparsity.get("predictor_input") or NOT_APPLICABLE,
            "mlp_trained_k": trained("mlp"), "att_trained_k": trained("att"),
            "dense_layers": " ".join(map(str, sparsity.get("dense_layers", []))) or
                            ("none" if sparsity else NOT_APPLICABLE)}


def write_tables(rows: list[dict], out_dir: Path) -> tuple[Path, Path]:
    csv_path, md_path = out_dir / "tasks.csv", out_dir / "tasks.md"
    write_csv_atomic(csv_path, rows, COLUMNS)

    def cell(value) -> str:
        return "n/a" if value in (None, "", "N/A") else f"{value:.4f}" if isinstance(value, float) else str(value)

    shown = COLUMNS[:-1]
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(cell(r[c]) for c in shown) + " |" for r in rows]
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def shard_of(text: str) -> tuple[int, int]:
    """'I/N' -> (I, N) with 0 <= I < N."""
    try:
        index, count = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard {text!r}: expected I/N, e.g. 0/4") from None
    if not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"--shard {text!r}: needs 0 <= I < N")
    return index, count


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-name", required=True, help="converted checkpoint directory (SPEC section 3)")
    p.add_argument("--tasks", default=DEJAVU_TASKS,
                   help="comma-separated harness task (or group) names (default: DejaVu's seven, %(default)s)")
    p.add_argument("--include-path", action="append", default=[],
                   help="a folder of task YAMLs to add (repeat), e.g. the one scripts/assets/make_local_task.py writes")
    add_sweep_arguments(p)
    p.add_argument("--sparse-layers", default=None, help="layers made sparse, e.g. 0,7,15-22 (default: all)")
    p.add_argument("--limit", type=int, default=None, help="first N examples of each task (default: all)")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: each task's own)")
    p.add_argument("--bootstrap-iters", type=int, default=100000,
                   help="the harness's bootstrap draws for the standard error of non-mean metrics such as perplexity "
                        "(acc has a closed form; default %(default)s, the harness's)")
    p.add_argument("--max-seq-len", type=int, default=None, help="the model's max length (default: its config's)")
    p.add_argument("--batch", type=int, default=16, help="requests per forward batch (default %(default)s)")
    p.add_argument("--seed", type=int, default=42, help="seed of the random mode (default %(default)s)")
    p.add_argument("--fewshot-seed", type=int, default=1234,
                   help="seed of the harness's few-shot sampler (default %(default)s, the harness's)")
    p.add_argument("--shard", type=shard_of, default=None, metavar="I/N",
                   help="evaluate only settings I, I+N, I+2N, ... of the plan (0-based; dense is setting 0) and write "
                        "no table: N such processes share one GPU that a small model leaves idle; a run without "
                        "--shard afterwards reuses their results and writes the table")
    p.add_argument("--table-only", action="store_true",
                   help="evaluate nothing: write the table from the results already in --out-dir (a lease that "
                        "ended before the sweep did); the (setting, task) pairs without one are left out, printed and "
                        "listed under 'missing' in tasks.manifest.json")
    p.add_argument("--out-dir", type=Path, required=True, help="per-task results, tasks.csv / tasks.md, manifest")
    args = p.parse_args(argv)
    if args.table_only and args.shard:
        p.error("--table-only writes the table of every setting's results: give it no --shard")
    args.tasks = [t for t in args.tasks.split(",") if t]
    args.family = family_of_checkpoint(args.model_name)
    check_sweep_arguments(args, args.family)
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    plan = plan_settings(args.modes, args.mlp_topk, args.att_topk, args.blocks, args.att_units,
                         gated=args.family == "llama")
    model = Path(args.model_name).name
    if args.table_only:
        return table_of_finished(args, plan, model)
    for folder in args.include_path:
        verify_task_folder(Path(folder))
    manager = task_manager(args.include_path, args.tasks)
    if args.shard:
        index, count = args.shard
        plan = plan[index::count]
    rows, models = [], Models()
    with tqdm(total=len(plan) * len(args.tasks), desc="task sweep (setting, task)", unit="run") as progress:
        for setting in plan:
            for path in run_setting(args, manager, models, setting, progress):
                rows += rows_of(path, model, args.out_dir)
    if args.shard:
        print(f"shard {index}/{count}: {len(plan)} settings x {len(args.tasks)} tasks in {args.out_dir / 'runs'}")
        return rows
    return write_table(args, rows, f"{len(plan)} settings x {len(args.tasks)} tasks")


def write_table(args, rows: list[dict], counted: str, **extra) -> list[dict]:
    csv_path, md_path = write_tables(rows, args.out_dir)
    write_json_atomic(args.out_dir / "tasks.manifest.json",
                      base_manifest(arguments={k: str(v) for k, v in vars(args).items()}, tasks=args.tasks,
                                    limit=args.limit, rows=rows, table=str(csv_path),
                                    weights=weights_provenance(args.model_name), **extra))
    print(f"wrote {len(rows)} rows ({counted}) -> {csv_path} and {md_path}")
    return rows


def table_of_finished(args, plan: list[Setting], model: str) -> list[dict]:
    """--table-only: the rows of every (setting, task) whose result exists (made with these settings), nothing run."""
    rows, missing = [], []
    for setting in plan:
        for task in args.tasks:
            if finished(args, setting, task):
                rows += rows_of(result_path(args, setting, task), model, args.out_dir)
            else:
                missing.append(f"{setting.name}/{task}")
    if missing:
        print(f"--table-only: {len(missing)} of {len(plan) * len(args.tasks)} (setting, task) pairs have no result "
              f"and are left out: {', '.join(missing)}")
    return write_table(args, rows, f"--table-only, {len(missing)} pairs missing", missing=missing)


if __name__ == "__main__":
    main()

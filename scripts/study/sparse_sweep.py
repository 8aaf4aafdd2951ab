"""Perplexity of DejaVu's sparse simulation over modes and budgets, next to the dense baseline, in one table.

For each request file (C4 validation, WikiText-2 windows, ...) runs the dense model once and then
every mode x budget with the `*-ml-att-sparse` model type, through dist_inference_runner (one
process, world size 1), and writes <out-dir>/sweep.csv and sweep.md with one row per setting:
model, dataset, mode, mlp_topk, att_topk, perplexity, tokens, output_manifest. A setting whose
output manifest already holds a perplexity is not run again, so an interrupted sweep resumes.

  python scripts/study/sparse_sweep.py --model-name pretrained_models/llama-3.2-3b --family llama \
      --predictor-dir data/llama-3.2-3b_c4_sparse_predictor --data c4=Decentralized_FM_alpha/c4_val/c4_valid.jsonl \
      --data wikitext2=data/wikitext2_requests.jsonl --mlp-topk 0.25 0.5 --att-topk 12 18 --out-dir out/sweep_llama
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tqdm import tqdm  # noqa: E402

from Decentralized_FM_alpha import dist_inference_runner  # noqa: E402
from Decentralized_FM_alpha.modules.sparsity import MODES, parse_budget  # noqa: E402
from Decentralized_FM_alpha.utils.manifest import base_manifest, weights_provenance, write_json_atomic  # noqa: E402

COLUMNS = ("model", "dataset", "mode", "mlp_topk", "att_topk", "perplexity", "tokens", "output_manifest")


def budget_pairs(mlp: list[str], att: list[str]) -> list[tuple[str | None, str | None]]:
    """Paired budgets when both lists are given (same length), else one block at a time."""
    for b in mlp + att:
        parse_budget(b)  # fail before any run
    if mlp and att:
        if len(mlp) != len(att):
            raise SystemExit(f"--mlp-topk and --att-topk pair up: give the same number ({len(mlp)} vs {len(att)})")
        return list(zip(mlp, att))
    return [(b, None) for b in mlp] + [(None, b) for b in att]


def settings(modes: list[str], pairs) -> list[tuple[str, str | None, str | None]]:
    return [("dense", None, None)] + [(m, mlp, att) for m in modes if m != "dense" for mlp, att in pairs]


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


def setting_name(mode: str, mlp: str | None, att: str | None) -> str:
    """One setting's name in file and folder names, e.g. oracle_mlp0.25_att5 (task_sweep.py names its runs so too)."""
    return mode + (f"_mlp{mlp}" if mlp else "") + (f"_att{att}" if att else "")


def output_stem(dataset: str, mode: str, mlp: str | None, att: str | None) -> str:
    return f"{dataset}_{setting_name(mode, mlp, att)}"


def run_setting(args, dataset: str, requests: Path, mode: str, mlp: str | None, att: str | None) -> dict:
    out = args.out_dir / f"{output_stem(dataset, mode, mlp, att)}.jsonl"
    manifest_path = Path(str(out) + ".manifest.json")
    if not (manifest_path.is_file() and "perplexity" in json.loads(manifest_path.read_text())):
        argv = ["--model-name", args.model_name, "--infer-data", str(requests), "--output-path", str(out),
                "--dtype", args.dtype, "--use-cuda", args.use_cuda, "--seed", str(args.seed),
                "--token-micro-batch-size", str(args.batch)]
        if args.max_seq_len:
            argv += ["--max-seq-len", str(args.max_seq_len)]
        if args.num_iters:
            argv += ["--num-iters", str(args.num_iters)]
        if mode == "dense":
            argv += ["--model-type", args.family]
        else:
            argv += ["--model-type", f"{args.family}-ml-att-sparse", "--sparse-mode", mode]
            argv += (["--mlp-topk", mlp] if mlp else []) + (["--att-topk", att] if att else [])
            argv += ["--predictor-dir", args.predictor_dir] if mode == "predictor" else []
            argv += ["--gqa-groups"] if args.gqa_groups else []
        dist_inference_runner.main(argv)
    perplexity = json.loads(manifest_path.read_text())["perplexity"]
    return {"model": Path(args.model_name).name, "dataset": dataset, "mode": mode, "mlp_topk": mlp or "dense",
            "att_topk": att or "dense", "perplexity": perplexity["perplexity"], "tokens": perplexity["tokens"],
            "output_manifest": str(manifest_path)}


def write_tables(rows: list[dict], out_dir: Path) -> tuple[Path, Path]:
    csv_path, md_path = out_dir / "sweep.csv", out_dir / "sweep.md"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(COLUMNS[:-1]) + " |", "|" + "---|" * (len(COLUMNS) - 1)]
    lines += ["| " + " | ".join(f"{r[c]:.4f}" if c == "perplexity" else str(r[c]) for c in COLUMNS[:-1]) + " |"
              for r in rows]
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def add_sweep_arguments(p: argparse.ArgumentParser) -> None:
    """Modes, budgets and the model's compute flags, as this sweep and scripts/study/task_sweep.py share them."""
    p.add_argument("--modes", nargs="+", choices=MODES, default=["oracle", "predictor", "random"],
                   help="sparse modes to run besides the dense baseline (default: oracle predictor random)")
    p.add_argument("--mlp-topk", nargs="*", default=[], help="MLP budgets: counts or fractions < 1")
    p.add_argument("--att-topk", nargs="*", default=[], help="attention budgets (paired with --mlp-topk if both)")
    p.add_argument("--predictor-dir", default=None, help="trained predictors (needed for mode predictor)")
    p.add_argument("--gqa-groups", action="store_true", help="Llama: keep whole key/value groups")
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp32", help="compute dtype (default fp32)")
    p.add_argument("--use-cuda", choices=("true", "false"), default="false", help="run on the GPU (default false)")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-name", required=True, help="converted checkpoint directory")
    p.add_argument("--family", choices=("opt", "llama"), required=True, help="model family")
    p.add_argument("--data", action="append", required=True, metavar="NAME=PATH",
                   help="a request file to score (repeat): e.g. c4=c4_valid.jsonl wikitext2=wikitext2.jsonl")
    add_sweep_arguments(p)
    p.add_argument("--max-seq-len", type=int, default=None, help="passed to the runner")
    p.add_argument("--num-iters", type=int, default=None, help="score only the first N requests of each file")
    p.add_argument("--batch", type=int, default=8, help="--token-micro-batch-size of the runner (default 8)")
    p.add_argument("--seed", type=int, default=42, help="seed of the random mode (default 42)")
    p.add_argument("--out-dir", type=Path, required=True, help="outputs, their manifests and the tables")
    args = p.parse_args(argv)
    if "predictor" in args.modes and not args.predictor_dir:
        raise SystemExit("mode predictor needs --predictor-dir")
    if not args.mlp_topk and not args.att_topk:
        raise SystemExit("give at least one budget (--mlp-topk and/or --att-topk)")
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    data = parse_data(args.data)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    plan = [(name, path, *s) for name, path in data.items()
            for s in settings(args.modes, budget_pairs(args.mlp_topk, args.att_topk))]
    rows = [run_setting(args, *item) for item in tqdm(plan, desc="sweep settings", unit="run")]
    csv_path, md_path = write_tables(rows, args.out_dir)
    write_json_atomic(args.out_dir / "sweep.manifest.json",
                      base_manifest(arguments={k: str(v) for k, v in vars(args).items()}, rows=rows, table=str(csv_path),
                                    weights=weights_provenance(args.model_name)))
    print(f"wrote {len(rows)} settings -> {csv_path} and {md_path}")
    return rows


if __name__ == "__main__":
    main()

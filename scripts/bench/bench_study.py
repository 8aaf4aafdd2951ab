"""The study at Llama-3.2-3B and OPT-2.7b shapes, every stage timed beside its floor, at several sizes.

Random bf16 weights at the exact configs (tests/fixtures/llama-3.2-3b-config.json, opt-2.7b-config.json), saved as
Hugging Face directories with the test tokenizer, go through scripts/run_study.py as a user runs it (convert included).
Before the studies, the machine's rates are measured: the bf16 matmul peak, the device copy bandwidth, and the read
and write bandwidth of the file systems the study uses (--out-dir, and --online-dir when given). Each stage's work is
what its processes counted (Decentralized_FM_alpha/utils/work.py, recorded per stage in study_manifest.json):
    floor = max(flops / matmul peak, device_bytes / copy bandwidth, file_bytes / file bandwidth)
(file bandwidth: the write bandwidth for convert and collect, which write; the read bandwidth otherwise). The table
gives seconds, floor, seconds / floor and the bound that sets the floor, per model and stage, for every size.

Sizes: --scales S ... multiply the study's per-model sizes (collected tokens, validation documents, WikiText-2
windows) and --task-limits L ... (one per scale) cap the documents of each task. With two or more sizes each stage's
seconds are fitted as a + b x driver (collect, predictors, analysis, summary: collected tokens; sweep: documents
scored; tasks: task documents evaluated; convert, requests, report: constant) and evaluated at the study's defaults
(scale 1, full task splits): stage_fits.json, which `run_study.py --plan` reads. Sizes after the first start from the
first size's converted weights (convert is measured once), and each size's activation files are deleted when it is
done (manifests kept), so the disk holds one size's collections at a time.

    python scripts/bench/bench_study.py --out out/bench_study --scales 0.05 0.1 --task-limits 10 20 -- --jobs 4
    python scripts/bench/bench_study.py --smoke --out out/bench_study_smoke     # CPU, tiny configs, about a minute
Arguments after -- go to run_study.py unchanged. Writes <out>/rates.json, <out>/s<scale>/ (each study, its log),
<out>/stage_table.json/.md and <out>/stage_fits.json.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import AutoConfig  # noqa: E402

from Decentralized_FM_alpha.utils.manifest import base_manifest, read_json, write_json_atomic  # noqa: E402
from scripts.assets.dejavu_tasks import documents_per_setting  # noqa: E402
from scripts.bench.common import (DISK_BLOCK, copy_bandwidth, disk_bandwidth, matmul_peak,  # noqa: E402
                                  save_random_hf)

MODELS = {"llama-3.2-3b": REPO / "tests/fixtures/llama-3.2-3b-config.json",
          "opt-2.7b": REPO / "tests/fixtures/opt-2.7b-config.json"}
DEFAULTS = {"collect_tokens": 200_000, "val_docs": 200, "wiki_windows": 64}  # run_study.py's
ROW_STAGES = ("collect", "predictors", "analysis", "summary")
WRITING_STAGES = ("convert", "collect")


# ------------------------------------------------------------------------------------- rates of the machine
def read_bandwidth(directory: Path, gigabytes: float, threads: int = 4) -> dict:
    """Bytes per second of reading a file just written in `directory` with `threads` parallel preads of 64 MiB (as
    the trainer reads collected rows: from the page cache, or RAM for a tmpfs such as /dev/shm)."""
    blocks = max(threads, int(gigabytes * 2**30 // DISK_BLOCK))
    path = directory / "read_test.bin"
    block = os.urandom(DISK_BLOCK)
    with open(path, "wb") as f:
        for _ in range(blocks):
            f.write(block)
    fd = os.open(path, os.O_RDONLY)
    buffers = [bytearray(DISK_BLOCK) for _ in range(threads)]
    try:
        from concurrent.futures import ThreadPoolExecutor

        def read(stream: int) -> None:
            for i in range(stream, blocks, threads):
                os.preadv(fd, [buffers[stream]], i * DISK_BLOCK)

        with ThreadPoolExecutor(threads) as pool:
            start = time.perf_counter()
            list(pool.map(read, range(threads)))
            seconds = time.perf_counter() - start
    finally:
        os.close(fd)
        path.unlink()
    return {"bytes": blocks * DISK_BLOCK, "seconds": seconds, "bytes_per_s": blocks * DISK_BLOCK / seconds,
            "method": f"{threads} threads of 64 MiB preads over a file just written (page cache or tmpfs)"}


def machine_rates(device: torch.device, folders: dict[str, Path], gigabytes: float) -> dict:
    peak, dtype = matmul_peak(device)
    rates = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
             "matmul_flops_per_s": peak, "matmul_dtype": dtype,
             "copy_bytes_per_s": copy_bandwidth(device, reps=20), "files": {}}
    for role, folder in folders.items():
        folder.mkdir(parents=True, exist_ok=True)
        rates["files"][role] = {"path": str(folder), "write": disk_bandwidth(folder, gigabytes),
                                "read": read_bandwidth(folder, gigabytes)}
    return rates


# ------------------------------------------------------------------------------------- the models
def build_hf_model(config_path: Path, out: Path, device: torch.device, seed: int, smoke: bool) -> Path:
    """Random bf16 weights of the config's architecture (norms perturbed), saved with the test tokenizer."""
    if (out / "config.json").is_file():
        return out
    config = AutoConfig.for_model(**{k: v for k, v in json.loads(config_path.read_text()).items()
                                     if k not in ("architectures", "transformers_version")})
    config.architectures = json.loads(config_path.read_text())["architectures"]
    if smoke:
        for key, value in smoke_dims(config).items():
            setattr(config, key, value)
    return save_random_hf(config, out, device, torch.bfloat16, seed)


def smoke_dims(config) -> dict:
    """A tiny stand-in of the same architecture for --smoke (CPU)."""
    dims = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "vocab_size": 512}
    if config.model_type == "opt":
        return {**dims, "ffn_dim": 128, "word_embed_proj_dim": 64, "max_position_embeddings": 512}
    return {**dims, "intermediate_size": 128, "num_key_value_heads": 2, "head_dim": 16}


# ------------------------------------------------------------------------------------- floors
def stage_floor(stage: str, work: dict, rates: dict, file_role: str) -> dict:
    """The floor of one stage's counted work and the bound that sets it."""
    files = rates["files"][file_role]
    file_rate = files["write" if stage in WRITING_STAGES else "read"]["bytes_per_s"]
    bounds = {"flops / matmul peak": work["flops"] / rates["matmul_flops_per_s"],
              "device bytes / copy bandwidth": work["device_bytes"] / rates["copy_bytes_per_s"],
              f"file bytes / {file_role} {'write' if stage in WRITING_STAGES else 'read'} bandwidth":
                  work["file_bytes"] / file_rate}
    bound = max(bounds, key=bounds.get)
    return {"floor_s": bounds[bound], "bound": bound, "bounds_s": bounds}


def stage_rows(study_dir: Path, rates: dict, file_role: str) -> list[dict]:
    """One row per (model, stage) of a finished study: pieces of a stage (online groups, task shards) summed."""
    manifest = read_json(study_dir / "study_manifest.json")
    rows: dict[tuple[str, str], dict] = {}
    for record in manifest["stages"]:
        if record.get("seconds") is None:
            continue
        stage = record["stage"].partition(" (")[0]
        row = rows.setdefault((record["model"], stage), {"model": record["model"], "stage": stage, "seconds": 0.0,
                                                         "pieces": 0, "work": {"flops": 0.0, "device_bytes": 0.0,
                                                                               "file_bytes": 0.0},
                                                         "peak_gpu_bytes_per_process": None, "disk_bytes": 0})
        row["seconds"] += record["seconds"]
        row["pieces"] += 1
        for key in row["work"]:
            row["work"][key] += record["work"][key]
        peak = record["work"].get("peak_gpu_bytes_per_process")
        if peak is not None:
            row["peak_gpu_bytes_per_process"] = max(peak, row["peak_gpu_bytes_per_process"] or 0)
        row["disk_bytes"] = max(row["disk_bytes"], record.get("disk_bytes", 0))
    for row in rows.values():
        row.update(stage_floor(row["stage"], row["work"], rates, file_role))
        row["over_floor"] = row["seconds"] / row["floor_s"] if row["floor_s"] > 0 else None
    return list(rows.values())


# ------------------------------------------------------------------------------------- sizes and fits
def settings_run(study: Path, model: str) -> dict[str, int]:
    """How many settings the study's sweep and task stages ran for the model (the plan scales their time by it)."""
    def distinct(path: Path, columns: tuple[str, ...]) -> int:
        if not path.is_file():
            return 0
        with open(path) as f:
            return len({tuple(row[c] for c in columns) for row in csv.DictReader(f)})

    setting = ("mode", "block", "mlp_topk", "att_topk", "att_unit")
    return {"sweep": distinct(study / "sweep" / model / "sweep.csv", setting),
            "tasks": distinct(study / "tasks" / model / "tasks.csv", setting)}


def model_dims(config_path: Path) -> dict[str, int]:
    """The shape a fit holds for (plan.py applies it only to a model of the same shape)."""
    config = json.loads(config_path.read_text())
    return {"hidden_size": config["hidden_size"], "num_layers": config["num_hidden_layers"],
            "ffn_dim": config.get("intermediate_size", config.get("ffn_dim")),
            "num_heads": config["num_attention_heads"],
            "num_kv_heads": config.get("num_key_value_heads", config["num_attention_heads"])}


def study_sizes(scale: float, task_limit: int | None) -> dict:
    """run_study.py's per-model sizes at this fraction of its defaults (at least one document of each)."""
    return {"collect_tokens": round(DEFAULTS["collect_tokens"] * scale),
            "val_docs": max(1, round(DEFAULTS["val_docs"] * scale)),
            "wiki_windows": max(1, round(DEFAULTS["wiki_windows"] * scale)), "task_limit": task_limit}


def drivers(sizes: dict) -> dict[str, float]:
    """The quantity each stage's time is fitted against (per model; the study-wide 'all' stages have none)."""
    return {**{stage: sizes["collect_tokens"] for stage in ROW_STAGES},
            "sweep": sizes["val_docs"] + sizes["wiki_windows"], "tasks": documents_per_setting(sizes["task_limit"])}


def size_flags(sizes: dict) -> list[str]:
    return ["--collect-tokens", str(sizes["collect_tokens"]), "--val-docs", str(sizes["val_docs"]),
            "--wiki-windows", str(sizes["wiki_windows"]),
            *(["--task-limit", str(sizes["task_limit"])] if sizes["task_limit"] else [])]


def fit_stages(tables: dict[str, list[dict]], sizes: dict[str, dict]) -> list[dict]:
    """Per (model, stage): seconds = a + b x driver by least squares over the sizes (a constant where the stage has
    no driver), and its value at the defaults (scale 1, full task splits)."""
    default = drivers(study_sizes(1.0, None))
    fits = []
    keys = sorted({(r["model"], r["stage"]) for rows in tables.values() for r in rows})
    for model, stage in keys:
        per_model = model != "all"  # the study-wide stages (requests, local tasks, report) have no driver
        points = [(sizes[name]["drivers"].get(stage) if per_model else None, r["seconds"])
                  for name, rows in tables.items() for r in rows if (r["model"], r["stage"]) == (model, stage)]
        x = np.array([p[0] if p[0] is not None else 0.0 for p in points], dtype=float)
        y = np.array([p[1] for p in points], dtype=float)
        b, a = np.polyfit(x, y, 1) if per_model and stage in default and len(set(x)) >= 2 else (None, None)
        if b is not None and b >= 0:
            at_default = a + b * default[stage]
            fit = {"a_s": float(a), "b_s_per_unit": float(b), "driver_at_default": default[stage]}
        else:  # no driver, or a time that fell as the size grew (noise above the size's effect): a constant
            at_default = float(y.mean())
            fit = {"a_s": at_default, "b_s_per_unit": 0.0, "driver_at_default": None,
                   **({"note": "the time fell as the driver grew: fitted as a constant"} if b is not None else {})}
        measured = [sizes[name]["settings"].get(model, {}).get(stage) for name in tables]
        fits.append({"model": model, "stage": stage, "points": [[float(a), float(b)] for a, b in zip(x, y)], **fit,
                     "default_s": float(at_default), "settings": measured[-1] if measured else None})
    return fits


# ------------------------------------------------------------------------------------- command line
def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder of the rates, studies, tables and fits")
    p.add_argument("--scales", type=float, nargs="+", default=[0.05, 0.1],
                   help="sizes as fractions of the study's defaults (default %(default)s)")
    p.add_argument("--task-limits", type=int, nargs="+", default=None,
                   help="--task-limit of each scale's study (default: full splits at every scale)")
    p.add_argument("--models", nargs="+", choices=tuple(MODELS), default=list(MODELS), help="default: both")
    p.add_argument("--online-dir", type=Path, default=None, help="run_study.py --online-dir (its rates are measured)")
    p.add_argument("--rate-test-gb", type=float, default=2.0, help="file size of the bandwidth tests (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny stand-ins of both architectures, tiny sizes")
    args = p.parse_args(argv)
    if args.task_limits is not None and len(args.task_limits) != len(args.scales):
        p.error("--task-limits needs one value per --scales value")
    return args, passthrough


def main(argv: list[str] | None = None) -> dict:
    args, passthrough = parse_args(argv)
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    args.out.mkdir(parents=True, exist_ok=True)
    folders = {"out-dir": args.out, **({"online-dir": args.online_dir} if args.online_dir else {})}
    rates_path = args.out / "rates.json"
    if not rates_path.is_file():
        write_json_atomic(rates_path, {**base_manifest(kind="bench_study_rates"),
                                       **machine_rates(device, folders, 0.05 if args.smoke else args.rate_test_gb)})
    rates = read_json(rates_path)
    print(f"rates: matmul {rates['matmul_flops_per_s'] / 1e12:.1f} TFLOP/s, copy "
          f"{rates['copy_bytes_per_s'] / 1e9:.0f} GB/s, " + ", ".join(
              f"{role} write {r['write']['bytes_per_s'] / 1e9:.2f} / read {r['read']['bytes_per_s'] / 1e9:.2f} GB/s"
              for role, r in rates["files"].items()), flush=True)
    models = [f"{name}={build_hf_model(MODELS[name], args.out / 'hf' / name, device, args.seed, args.smoke)}"
              for name in args.models]
    device_flags = ["--device", device.type, "--dtype", "bf16" if device.type == "cuda" else "fp32"]
    smoke = ["--train-docs", "4", "--max-seq-len", "256", "--epochs", "1", "--D", "8", "--mlp-budgets", "0.5",
             "--fractions", "0.5", "--distance-fraction", "0.5", "--capacity-widths", "4", "--capacity-rows", "0.5",
             "--folds", "2", "--drift-rows", "600", "--jobs", "1", "--modes", "predictor", "--blocks", "mlp",
             "--bootstrap-iters", "0"] if args.smoke else []
    tables, sizes = {}, {}
    for i, scale in enumerate(args.scales):
        limit = args.task_limits[i] if args.task_limits else None
        name = f"s{scale:g}"
        study = args.out / name
        chosen = study_sizes(scale, limit) if not args.smoke else {
            "collect_tokens": round(1200 * scale / args.scales[0]), "val_docs": 2, "wiki_windows": 1,
            "task_limit": limit or 2}
        flags = size_flags(chosen)
        command = [sys.executable, str(REPO / "scripts/run_study.py"), *models, "--out-dir", str(study),
                   *device_flags, *smoke, *flags,
                   *(["--online-dir", str(args.online_dir / name)] if args.online_dir else []), *passthrough]
        sizes[name] = {"scale": scale, **chosen, "command": command, "drivers": drivers(chosen)}
        print(f"[{name}] {' '.join(command)}", flush=True)
        started = time.time()
        with open(args.out / f"{name}.log", "a") as log:
            done = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        sizes[name]["wall_s"] = time.time() - started
        if done.returncode != 0:
            raise SystemExit(f"the study at {name} failed (exit {done.returncode}): see {args.out / f'{name}.log'}")
        if i == 0:  # later sizes start from this size's conversion (convert is measured once) ...
            models = [f"{name_}={study / 'converted' / name_}" for name_ in args.models]
        for rows_file in study.glob("data/*/*.mmap"):  # ... and the disk holds one size's collections at a time
            rows_file.unlink()
        sizes[name]["settings"] = {model: settings_run(study, model) for model in args.models}
        tables[name] = stage_rows(study, rates, "online-dir" if args.online_dir and any(
            r["stage"].startswith("collect (layers") for r in read_json(study / "study_manifest.json")["stages"])
            else "out-dir")
        write_tables(args.out, rates, sizes, tables)
    fits = fit_stages(tables, sizes) if len(args.scales) >= 2 else []
    write_json_atomic(args.out / "stage_fits.json", {**base_manifest(kind="bench_study_fits"), "sizes": sizes,
                                                     "dims": {m: model_dims(args.out / "hf" / m / "config.json") for m in args.models},
                                                     "defaults": {**DEFAULTS, "task_limit": None},
                                                     "drivers_at_default": drivers(study_sizes(1.0, None)), "fits": fits})
    return {"rates": rates, "tables": tables, "fits": fits}


def write_tables(out: Path, rates: dict, sizes: dict, tables: dict) -> None:
    write_json_atomic(out / "stage_table.json", {**base_manifest(kind="bench_study"), "rates": rates, "sizes": sizes,
                                                 "tables": tables})
    lines = [f"Device: {rates['device']}; matmul peak {rates['matmul_flops_per_s'] / 1e12:.0f} TFLOP/s "
             f"({rates['matmul_dtype']}), copy {rates['copy_bytes_per_s'] / 1e9:.0f} GB/s.", ""]
    for name, rows in tables.items():
        lines += [f"### {name}: {' '.join(sizes[name]['command'][2:])}", "",
                  "| model | stage | seconds | floor (s) | seconds / floor | bound | peak GPU GiB (one process) |",
                  "|---|---|---|---|---|---|---|"]
        for r in rows:
            peak, over = r["peak_gpu_bytes_per_process"], r["over_floor"]
            lines.append(f"| {r['model']} | {r['stage']} | {r['seconds']:.1f} | {r['floor_s']:.2f} | "
                         f"{'n/a' if over is None else f'{over:.1f}'} | {r['bound']} | "
                         f"{'n/a' if peak is None else f'{peak / 2**30:.1f}'} |")
        total = sum(r["seconds"] for r in rows)
        lines += ["", f"Total {total:.0f} s ({total / 60:.1f} min); wall {sizes[name]['wall_s']:.0f} s.", ""]
    (out / "stage_table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()

"""The run_c4_*.sh helpers: train every layer of a collection over all visible GPUs, then summarize.

    python sparse_predictor/trainer/launch.py launch MAIN --block mlp --data-dir D --out-dir O --log-dir L [-- MAIN's flags]
    python sparse_predictor/trainer/launch.py summarize --block mlp --out-dir O [--num-layers N]
"""
from __future__ import annotations

import argparse
import glob
import os
import queue
import shutil
import subprocess
import sys
import threading
from pathlib import Path

from tqdm import tqdm

if __name__ == "__main__":  # lets `python sparse_predictor/trainer/launch.py ...` find the repo's packages
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from Decentralized_FM_alpha.utils.activation_store import ActivationStore  # noqa: E402
from Decentralized_FM_alpha.utils.selection import parse_layer_list  # noqa: E402
from sparse_predictor.trainer.labels import BLOCKS  # noqa: E402
from sparse_predictor.trainer.records import summarize  # noqa: E402


def visible_gpus() -> list[str]:
    """GPU ids to spread layers over: CUDA_VISIBLE_DEVICES if set ('' = none), else nvidia-smi's count."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    if shutil.which("nvidia-smi") is None:
        return []
    listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    if listing.returncode != 0:
        raise RuntimeError(f"nvidia-smi -L failed ({listing.stderr.strip()}); set CUDA_VISIBLE_DEVICES='' to train "
                           f"on the CPU")
    return [str(i) for i in range(sum(line.startswith("GPU ") for line in listing.stdout.splitlines()))]


def launch(main_script: str, block: str, data_dir: str, out_dir: str, log_dir: str, main_args: list[str],
           jobs_per_gpu: int = 1, layers_per_job: int = 1, layers: str = "all") -> int:
    """Train the layers (default every layer of the manifest) over all visible GPUs, one process and one log per
    job of `layers_per_job` consecutive layers (1: a process per layer, as the original); summarize every layer
    JSON of the folder (those of earlier runs too), failing when one of these layers has none."""
    chosen = parse_layer_list(layers, ActivationStore(data_dir).num_layers)
    num_layers = len(chosen)
    gpus = visible_gpus()
    slots = [g for g in gpus for _ in range(jobs_per_gpu)] or [None] * jobs_per_gpu  # CPU: jobs_per_gpu processes
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    print(f"{num_layers} layers of {data_dir} on {', '.join(f'GPU {g}' for g in gpus) or 'the CPU'}; logs in {log_dir}")
    todo: queue.Queue[range] = queue.Queue()
    for start in range(0, num_layers, layers_per_job):
        todo.put(chosen[start:start + layers_per_job])
    failed: list[int] = []
    progress = tqdm(total=num_layers, desc=f"{block} layers", unit="layer")

    def worker(gpu: str | None) -> None:
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=gpu if gpu is not None else "")
        while True:
            try:
                layers = todo.get_nowait()
            except queue.Empty:
                return
            spec = str(layers[0]) if len(layers) == 1 else ",".join(map(str, layers))
            command = [sys.executable, main_script, "--data-dir", data_dir, "--out-dir", out_dir, "--L", spec,
                       "--device", "cpu" if gpu is None else "cuda:0", *main_args]
            name = f"{block}_layer{spec}.log" if len(layers) == 1 else f"{block}_layers{layers[0]}-{layers[-1]}.log"
            with open(Path(log_dir) / name, "w") as log:
                log.write(" ".join(command) + "\n")
                log.flush()
                if subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode != 0:
                    failed.extend(layers)
            progress.update(len(layers))

    threads = [threading.Thread(target=worker, args=(gpu,)) for gpu in slots]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    progress.close()
    if failed:
        print(f"FAILED layers {sorted(failed)}: see {log_dir}/{block}_layer<L>.log")
    missing = []
    for directory in predictor_dirs(out_dir):
        csv_path, md_path, _ = summarize(directory, block)
        print(f"wrote {csv_path} and {md_path}")
        print(md_path.read_text())
        missing += sorted(set(chosen) - layer_jsons(directory, block))
    return 1 if failed or missing else 0


def layer_jsons(directory: Path, block: str) -> set[int]:
    """The layers with a {block}_layer{L}.json in `directory`."""
    return {int(p.stem.removeprefix(f"{block}_layer")) for p in directory.glob(f"{block}_layer*.json")
            if p.stem.removeprefix(f"{block}_layer").isdigit()}


def predictor_dirs(out_dir: str) -> list[Path]:
    """--out-dir, or with {k} (several fractions trained together) every folder the template names."""
    if "{k}" not in out_dir:
        return [Path(out_dir)]
    found = sorted(Path(p) for p in glob.glob(glob.escape(out_dir).replace(glob.escape("{k}"), "*")))
    if not found:
        raise FileNotFoundError(f"no folder matches --out-dir {out_dir}")
    return found


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    main_args = argv[argv.index("--") + 1:] if "--" in argv else []  # flags for every main, after --
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description="Helpers of the run_c4_*.sh scripts. launch: ... -- MAIN_FLAGS "
                                                 "passes MAIN_FLAGS to every main.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("launch", help="train every layer of a collection over all visible GPUs, then summarize")
    run.add_argument("main_script", help="sparse_predictor/main_{mlp,att}[_llama].py")
    run.add_argument("--block", choices=BLOCKS, required=True, help="mlp or att: names the outputs")
    run.add_argument("--data-dir", required=True, help="collected activations; its manifest gives the layers")
    run.add_argument("--out-dir", required=True, help="predictor checkpoints, JSONs and the summary")
    run.add_argument("--log-dir", required=True, help="one log per layer: {block}_layer{L}.log")
    run.add_argument("--jobs-per-gpu", type=int, default=1,
                     help="training processes at once on each GPU, or on the CPU when there is none (default 1)")
    run.add_argument("--layers", default="all",
                     help="layers to train: 'all' (default: every layer of the manifest) or a list such as 0-13 "
                          "or 0,4,8")
    run.add_argument("--layers-per-job", type=int, default=1,
                     help="consecutive layers one process trains in turn (default 1: a process per layer)")
    summary = sub.add_parser("summarize", help="write {block}_summary.csv/.md from the per-layer JSONs")
    summary.add_argument("--block", choices=BLOCKS, required=True, help="mlp or att")
    summary.add_argument("--out-dir", required=True, help="directory of {block}_layer{L}.json")
    summary.add_argument("--num-layers", type=int, default=None, help="expected layers; missing ones fail the run")
    args = parser.parse_args(argv)
    if args.command == "launch":
        return launch(args.main_script, args.block, args.data_dir, args.out_dir, args.log_dir, main_args,
                      args.jobs_per_gpu, args.layers_per_job, args.layers)
    csv_path, md_path, missing = summarize(args.out_dir, args.block, args.num_layers)
    print(md_path.read_text())
    print(f"wrote {csv_path} and {md_path}" + (f"; MISSING layers {missing}" if missing else ""))
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())

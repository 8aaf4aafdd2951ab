"""The whole study as one command, for any list of models: convert -> request files -> collect -> predictors for
every layer -> sparse sweep -> downstream tasks -> drift, sparsity and the summary's predictors -> report.

Each stage runs the project's own command (the one the README documents), so its outputs carry their usual
manifests; the study adds one progress line per stage and `<out-dir>/study_manifest.json` with the command, the
settings and the wall time of every stage, which the report shows. A rerun resumes: finished stages are skipped
(the wall time of the run that did them is kept) and unfinished ones continue where their own command can.

MODEL is SOURCE or NAME=SOURCE; SOURCE is a Hugging Face model directory or hub id (converted), a .gguf file
(converted, dequantized), or an already converted directory (SPEC §3, used as is). NAME defaults to its last part.

    python scripts/run_study.py pretrained_models/tiny-opt pretrained_models/tiny-llama --out-dir out/study \\
        --device cpu --collect-tokens 20000 --epochs 4 --D 128 --seeds 1
    python scripts/run_study.py llama-3.2-3b=meta-llama/Llama-3.2-3B opt-2.7b=facebook/opt-2.7b \\
        --out-dir out/study_3b --device cuda --dtype bf16          # the GPU-site study (README)

Layout of --out-dir: requests/ (with lm_eval_tasks/, the offline tasks), converted/<name>/, data/<name>_c4/,
predictors/<name>/, sweep/<name>/, tasks/<name>/, analysis/<name>/, report/report.md. With --collection online
there is no data/: each layer group is collected into --online-dir, used and deleted (analysis/<name>/online/ keeps
the per-group markers and the collection's manifest); see --collection.
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from Decentralized_FM_alpha.modules.sparsity import DEFAULT_DENSE_LAYERS, parse_budget  # noqa: E402
from Decentralized_FM_alpha.utils.manifest import base_manifest, read_json, write_json_atomic  # noqa: E402
from Decentralized_FM_alpha.utils.work import WORK_LOG, read_log  # noqa: E402
from Decentralized_FM_alpha.utils.model_source import (family_of_checkpoint, module_family,  # noqa: E402
                                                       require_local_path_or_hub_id)
from scripts.assets.dejavu_tasks import TASK_NAMES as DEJAVU_TASKS, documents_per_setting  # noqa: E402
from scripts.study.plan import (FLOAT16, check_disk, collection_bytes, free_disk, gib,  # noqa: E402
                                layer_collection_bytes, layer_groups, measured_rates, mmap_need_and_free,
                                model_facts, plan_model)
from scripts.study.sparse_sweep import BLOCKS as SWEEP_BLOCKS, SPARSE_MODES, budget_name, plan_settings  # noqa: E402

STUDY_MODES = tuple(m for m in SPARSE_MODES if m != "structured")  # the study trains no structured predictors

STAGES = ("convert", "requests", "collect", "predictors", "sweep", "tasks", "analysis", "summary", "report")
STUDY_MANIFEST = "study_manifest.json"
ONLINE_TMPFS = Path("/dev/shm/dejavu-online")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    source: str

    @property
    def is_converted(self) -> bool:
        return (Path(self.source) / "pytorch_embs.pt").is_file()

    @property
    def is_gguf(self) -> bool:
        return self.source.endswith(".gguf")


def parse_model(text: str) -> ModelSpec:
    name, sep, source = text.partition("=")
    if not sep:
        name, source = Path(text.rstrip("/")).stem if text.endswith(".gguf") else Path(text.rstrip("/")).name, text
    if not name or not source:
        raise argparse.ArgumentTypeError(f"model must be SOURCE or NAME=SOURCE, got {text!r}")
    try:
        require_local_path_or_hub_id(source, "MODEL")
    except FileNotFoundError as e:
        raise argparse.ArgumentTypeError(str(e)) from e
    return ModelSpec(name, source)


class Study:
    """Runs stages, times them, and keeps study_manifest.json current after each one."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.out = args, args.out_dir
        self.out.mkdir(parents=True, exist_ok=True)
        self.manifest_path = self.out / STUDY_MANIFEST
        old = read_json(self.manifest_path) if self.manifest_path.is_file() else {}
        self.stages: dict[str, dict] = {stage_key(s): s for s in old.get("stages", [])}
        self.manifest = base_manifest(kind="study", settings={k: str(v) for k, v in vars(args).items()})
        self.started = time.time()
        self.env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        if args.device == "cpu":
            self.env["CUDA_VISIBLE_DEVICES"] = ""

    def run(self, model: str, stage: str, commands: list[list[str]] | Callable[[], list[list[str]]], done: bool,
            parallel: bool = False, env: dict | Callable[[], dict] | None = None, part: str = "",
            jobs: int | None = None) -> None:
        """Run a stage's commands (at most --jobs at once when parallel) unless `done` or not in --stages; record
        its wall time. Commands and env may be callables, built only when the stage runs (they read its inputs).
        `part` names one piece of a stage run in pieces (the online path's layer groups), recorded as its own row;
        `jobs` replaces --jobs as the bound on parallel commands."""
        key = f"{model}/{stage}" + (f"/{part}" if part else "")
        label = stage + (f" ({part})" if part else "")
        prefix = f"[{time.time() - self.started:7.0f} s] {model}: {label}"
        if stage not in self.args.stages:
            print(f"{prefix}: not in --stages, skipped", flush=True)
            return
        if done:
            print(f"{prefix}: done earlier, skipped", flush=True)
            self.stages.setdefault(key, {"model": model, "stage": label, "seconds": None, "commands": []})
            return
        commands = [[str(part) for part in command] for command in (commands() if callable(commands) else commands)]
        earlier = self.stages.get(key, {}).get("interrupted_seconds", 0.0)  # attempts stopped before the end
        work_log = self.out / "work" / (key.replace("/", "__").replace(" ", "_") + ".jsonl")
        work_log.parent.mkdir(parents=True, exist_ok=True)
        if not earlier:
            work_log.unlink(missing_ok=True)  # a stage run afresh counts only this run's work
        env = {**(env() if callable(env) else env or {}), WORK_LOG: str(work_log)}
        print(f"{prefix} ...", flush=True)
        start = time.time()
        pending = list(commands)
        running: list[tuple[list[str], subprocess.Popen]] = []
        try:
            while pending or running:
                while pending and (not running or (parallel and len(running) < (jobs or self.args.jobs))):
                    command = pending.pop(0)
                    running.append((command, subprocess.Popen(command, cwd=REPO, env={**self.env, **env})))
                command, process = running.pop(0)
                if process.wait() != 0:
                    for _, other in running:
                        other.wait()
                    raise SystemExit(f"{key} failed (exit {process.returncode}): {shlex.join(command)}")
        except KeyboardInterrupt:  # also SIGTERM (see main): keep the time spent, so a resumed stage counts it all
            for _, process in running:
                process.terminate()
                process.wait()
            self.stages[key] = {"model": model, "stage": label, "seconds": None, "commands": [],
                                "interrupted_seconds": earlier + time.time() - start}
            self.save()
            raise
        seconds = earlier + time.time() - start
        self.stages[key] = {"model": model, "stage": label, "seconds": seconds,
                            "commands": [shlex.join(c) for c in commands], "work": read_log(work_log),
                            "disk_bytes": disk_usage(self.out), "online_dir_bytes": disk_usage(self.args.online_dir)}
        self.save()
        print(f"{prefix}: done in {seconds:.0f} s" + (f" (of which {earlier:.0f} s in interrupted runs)"
                                                       if earlier else ""), flush=True)

    def save(self) -> None:
        write_json_atomic(self.manifest_path, {**self.manifest, "study": True, "stages": list(self.stages.values()),
                                               "models": [m.__dict__ for m in self.args.models]})


def disk_usage(folder: Path) -> int:
    """Bytes of the files under `folder` (allocated blocks: a preallocated collection counts in full); 0 when absent."""
    return sum(f.stat().st_blocks * 512 for f in folder.rglob("*") if f.is_file() and not f.is_symlink())


def stage_key(record: dict) -> str:
    """The key of a stage record: model/stage, then /part for a stage run in pieces ('collect (layers 0-1)')."""
    stage, _, part = record["stage"].partition(" (")
    return f"{record['model']}/{stage}" + (f"/{part.removesuffix(')')}" if part else "")


def python(script: str, *args: object) -> list[str]:
    return [sys.executable, str(REPO / script), *map(str, args)]


def complete(path: Path) -> bool:
    return path.is_file() and read_json(path).get("complete") is True


def study_requests(study: Study) -> tuple[Path, Path]:
    a, requests = study.args, study.out / "requests"
    train, val = requests / "c4_train.jsonl", requests / "c4_val.jsonl"
    source = [] if a.hub else ["--from-file"]
    study.run("all", "requests", [
        python("Decentralized_FM_alpha/c4_train/getdata.py", *source, *([a.c4_train_file] if not a.hub else []),
               "--num-docs", a.train_docs, "--output", train),
        python("Decentralized_FM_alpha/c4_val/getdata.py", *source, *([a.c4_val_file] if not a.hub else []),
               "--num-docs", a.val_docs, "--output", val)],
        done=train.is_file() and val.is_file())
    return train, val


def local_tasks(study: Study) -> Path:
    """The offline tasks (scripts/assets/make_local_task.py: DejaVu's seven over the bundled splits and the WikiText-2
    test task), written once for every model's 'tasks' stage."""
    folder = study.out / "requests" / "lm_eval_tasks"
    manifest = folder / "task_manifest.json"
    study.run("all", "tasks", [python("scripts/assets/make_local_task.py", "--out-dir", folder)],
              done=manifest.is_file() and set(DEJAVU_TASKS) <= set(read_json(manifest)["tasks"]))
    return folder


def convert(study: Study, model) -> Path:
    if model.is_converted:
        return Path(model.source)
    target = study.out / "converted" / model.name
    if model.is_gguf:
        command = python("Decentralized_FM_alpha/convert_llama_checkpoint.py", "--model-name", model.source)
    else:
        from transformers import AutoConfig

        family = module_family(AutoConfig.from_pretrained(model.source).model_type, model.source)
        command = python(f"Decentralized_FM_alpha/convert_{family}_checkpoint.py", "--model-name", model.source)
    study.run(model.name, "convert", [command + ["--save-path", target]],
              done=(target / "conversion_manifest.json").is_file())
    return target


def wikitext_requests(study: Study, model: str, converted: Path) -> Path:
    """The first --wiki-windows windows of WikiText-2, cut with this model's tokenizer (part of 'requests')."""
    a = study.args
    full = study.out / "requests" / f"wikitext2_{model}_all.jsonl"
    chosen = study.out / "requests" / f"wikitext2_{model}.jsonl"
    study.run(model, "requests", [python("Decentralized_FM_alpha/wikitext2/getdata.py", "--tokenizer", converted,
                                         "--max-seq-len", a.max_seq_len, "--output", full,
                                         *(["--from-hub"] if a.hub else []))], done=full.is_file())
    if not chosen.is_file():
        lines = full.read_text(encoding="utf-8").splitlines(keepends=True)
        chosen.write_text("".join(lines[: a.wiki_windows or None]), encoding="utf-8")
    return chosen


def tasks_done(manifest: Path, command: list[str]) -> bool:
    """The task table was written by this very task_sweep.py command: other tasks, modes, blocks, budgets, limit or
    shots rerun it (the finished (setting, task) results are kept and reused)."""
    if not manifest.is_file():
        return False
    return read_json(manifest).get("argv", [])[1:] == [str(part) for part in command[2:]]


@dataclass
class ModelRun:
    """What the stages of one model share."""
    study: Study
    model: ModelSpec
    converted: Path
    family: str
    train: Path
    budgets: "BudgetFolders"
    analysis: Path

    @property
    def a(self) -> argparse.Namespace:
        return self.study.args

    @property
    def training(self) -> list:
        return ["--epochs", self.a.epochs, "--D", self.a.D, "--selection", self.a.selection]

    @property
    def device(self) -> list[str]:
        return ["--device", "cuda:0" if self.a.device == "cuda" else "cpu"]

    @property
    def num_layers(self) -> int:
        return read_json(self.converted / "config.json")["num_hidden_layers"]

    def collect(self, data: Path, capacity: int, *extra: object) -> list[str]:
        """The collection command into `data` (its first `capacity` rows; `extra`: --collect-layers/-kinds)."""
        a = self.a
        return python("Decentralized_FM_alpha/dist_inference_runner.py", "--model-name", self.converted,
                      "--model-type", f"{self.family}-save", "--infer-data", self.train, "--output-path",
                      data / "collect_output.jsonl", "--data-path", data, "--collect-tokens", capacity,
                      "--use-cuda", "true" if a.device == "cuda" else "false", "--dtype", a.dtype, "--max-seq-len",
                      a.max_seq_len, "--token-micro-batch-size", a.batch,
                      *(["--collect-mlp-gate"] if self.family == "llama" else []), *extra)

    def drift(self, data: Path) -> list[str]:
        a = self.a
        return python("scripts/analysis/drift.py", "--data-dir", data, "--out-dir", self.analysis, "--model-dir",
                      self.converted, "--max-distance", a.drift_distance, "--first-rows", a.drift_rows,
                      "--exclude-first-token", "--exclude-massive-dims", a.massive_dims, *self.device)

    def sparsity(self, data: Path, layers: list[int] | None = None) -> list[str]:
        """sparsity_stats.py over all layers, or over `layers` only as a group's partial results."""
        middle = self.num_layers // 2  # the label sweep's layer
        chosen: list = ["--sweep-layers", middle]
        if layers:
            chosen = ["--partial-only", "--layers", layer_text(layers),
                      *(chosen if middle in layers else ["--no-label-sweep"])]
        return python("scripts/analysis/sparsity_stats.py", "--data-dir", data, "--out-dir", self.analysis,
                      "--labels", self.a.sweep_labels, *chosen, *self.training, *self.device)

    def summary(self, data: Path, layers: list[int] | None = None) -> list[str]:
        """recall_summary.py over all layers, or over `layers` only as a group's partial results."""
        a = self.a
        return python("scripts/analysis/recall_summary.py", "--data-dir", data, "--out-dir", self.analysis, "--seeds",
                      a.seeds, "--fractions", ",".join(map(str, a.fractions)), "--distance-fraction",
                      a.distance_fraction, "--jobs", a.jobs, *self.training, *summary_curve_flags(a), *self.device,
                      *(["--layers", layer_text(layers), "--partial-only"] if layers else []))

    def predictors(self, data: Path, layers: list[int] | None = None) -> list[list[str]]:
        return predictor_commands(self.a, self.family, data, self.budgets, self.training,
                                  layers or list(range(self.num_layers)))


def at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: needs at least 1")
    return value


def layer_text(layers: list[int]) -> str:
    return ",".join(map(str, layers))


def study_model(study: Study, model, train: Path, val: Path, tasks: Path) -> list[Path]:
    """Every per-model stage; returns what the report reads."""
    a = study.args
    converted = convert(study, model)
    family = family_of_checkpoint(converted)
    wiki = wikitext_requests(study, model.name, converted)
    budgets = BudgetFolders(study.out / "predictors" / model.name, a)
    run = ModelRun(study, model, converted, family, train, budgets, study.out / "analysis" / model.name)
    read = mmap_stages(run) if a.collection == "mmap" else online_stages(run)

    sweep = study.out / "sweep" / model.name
    study.run(model.name, "sweep", [python(
        "scripts/study/sparse_sweep.py", "--model-name", converted, "--family", family, "--data", f"c4={val}",
        "--data", f"wikitext2={wiki}", *sweep_flags(a, budgets, converted, a.modes, a.blocks), "--max-seq-len",
        a.max_seq_len,
        "--use-cuda", "true" if a.device == "cuda" else "false", "--dtype", a.dtype, "--batch", a.batch,
        "--out-dir", sweep)],
        done=(sweep / "sweep.manifest.json").is_file())

    downstream = study.out / "tasks" / model.name
    if a.tasks:  # --tasks '' leaves the stage out (a node without lm-eval installed)
        task_sweep = python(
            "scripts/study/task_sweep.py", "--model-name", converted, "--include-path", tasks, "--tasks", a.tasks,
            *sweep_flags(a, budgets, converted, a.task_modes or a.modes, a.task_blocks or a.blocks), "--batch",
            a.task_batch or a.batch, "--use-cuda", "true" if a.device == "cuda" else "false", "--dtype", a.dtype,
            "--max-seq-len", a.max_seq_len, "--bootstrap-iters", a.bootstrap_iters,
            *(["--limit", a.task_limit] if a.task_limit else []), "--num-fewshot", a.num_fewshot, "--out-dir",
            downstream)
        done = tasks_done(downstream / "tasks.manifest.json", task_sweep)
        if a.task_jobs > 1:  # shards first (they write the per-task results), then the table from their results
            study.run(model.name, "tasks", [[*task_sweep, "--shard", f"{i}/{a.task_jobs}"] for i in range(a.task_jobs)],
                      done=done, parallel=True, jobs=a.task_jobs, part="shards")
        study.run(model.name, "tasks", [task_sweep], done=done)
    return [*read, budgets.root, sweep / "sweep.csv", *([downstream / "tasks.csv"] if a.tasks else []), run.analysis]


def analysis_done(run: ModelRun) -> bool:
    a, analysis = run.a, run.analysis
    return ((analysis / "drift.json").is_file() and (analysis / "sparsity_stats.json").is_file()
            and (not a.lookahead_distance or (analysis / "lookahead_att.json").is_file()))


def mmap_stages(run: ModelRun) -> list[Path]:
    """Collect every layer into out/data/<model>_c4/, then the stages that read it; returns the collection."""
    study, a, name = run.study, run.a, run.model.name
    data = study.out / "data" / f"{name}_c4"
    study.run(name, "collect", [run.collect(data, a.collect_tokens)], done=complete(data / "manifest.json"))
    study.run(name, "predictors", lambda: run.predictors(data),
              done=complete(data / "manifest.json") and run.budgets.complete(run.converted, run.num_layers))

    def analysis_commands() -> list[list]:
        commands = [run.drift(data), run.sparsity(data)]
        if a.lookahead_distance:
            commands += [python("scripts/analysis/lookahead.py", "--data-dir", data, "--out-dir", run.analysis,
                                "--block", block, "--max-distance", a.lookahead_distance, *run.training, *run.device)
                         for block in ("mlp", "att")]
        return commands

    study.run(name, "analysis", analysis_commands, parallel=True, done=analysis_done(run))
    study.run(name, "summary", [run.summary(data)], done=(run.analysis / "recall_summary.json").is_file())
    return [data]


def input_lookback(predictor_input: str, num_layers: int) -> int:
    """How many layers before a layer the inputs of its predictors reach: the study's --predictor-input and the
    summary's input variants (recall_summary.input_variants), at the last layer where all of them exist."""
    from scripts.analysis.recall_summary import input_variants
    from sparse_predictor.trainer.labels import resolve_input

    last = num_layers - 1
    flags = {(block, flag) for block in ("mlp", "att") for _, flag in input_variants(block, last)}
    flags |= {(block, predictor_input) for block in ("mlp", "att")}
    return max(last - resolve_input(block, flag, last).layer for block, flag in flags)


def online_stages(run: ModelRun) -> list[Path]:
    """The stages that read activations, one layer group at a time (plan.layer_groups: the group's rows with the
    earlier layers its inputs read fit --memory-budget-gb) from a collection of those layers in --online-dir, deleted
    after the group; the last group's collection also serves the merge of every group's partial results into the
    outputs the mmap path writes. Each group's forward pass stops after its last layer (--max-layers). Then drift on
    its own collection of the first --drift-rows rows. A finished group leaves <analysis>/online/layers<A>-<B>.json
    and is skipped on a rerun; <analysis>/online/manifest.json records the collection. Returns no collection folder:
    the report finds that record in the analysis folder."""
    study, a, name = run.study, run.a, run.model.name
    if a.lookahead_distance:
        raise SystemExit("--lookahead-distance reads the mmap collection: use --collection mmap")
    if "collect" not in a.stages:  # every online stage reads a collection it makes itself
        print(f"{name}: online stages need 'collect' in --stages: predictors, analysis and summary skipped", flush=True)
        return []
    data = a.online_dir / f"{name}_c4"
    groups = online_groups(a, run.model, run.num_layers)
    lookback = input_lookback(a.predictor_input, run.num_layers)
    stages = [s for s in ("predictors", "analysis", "summary") if s in a.stages]
    for i, group in enumerate(groups):
        layers, first = list(group), max(group[0] - lookback, 0)
        marker = run.analysis / "online" / f"layers{group[0]}-{group[-1]}.json"
        part = f"layers {group[0]}-{group[-1]}"
        if marker.is_file() and set(stages) <= set(read_json(marker)["stages"]):
            print(f"{name}: online group {part} done earlier, skipped", flush=True)
            continue
        clear_other_collection(data, [first, group[-1]])
        study.run(name, "collect", [run.collect(data, a.collect_tokens, "--collect-layers", f"{first}-{group[-1]}",
                                                "--max-layers", group[-1] + 1)],  # no layer past the group runs
                  done=complete(data / "manifest.json"), part=part)
        study.run(name, "predictors", lambda: run.predictors(data, layers), done=False, part=part)
        study.run(name, "analysis", [run.sparsity(data, layers)], done=False, part=part)
        study.run(name, "summary", [run.summary(data, layers)], done=False, part=part)
        if i == len(groups) - 1:  # every layer's partial results exist: the merged outputs, from this collection
            study.run(name, "analysis", [run.sparsity(data)], done=False, part="merge")
            study.run(name, "summary", [run.summary(data)], done=False, part="merge")
            keep_collection_record(data, run.analysis / "online", groups, lookback)
        marker.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(marker, {"layers": layers, "collected_layers": [first, group[-1]], "stages": stages})
        shutil.rmtree(data)
    drift = a.online_dir / f"{name}_drift"
    if "analysis" in a.stages and not (run.analysis / "drift.json").is_file():
        study.run(name, "collect", [run.collect(drift, a.drift_rows, "--collect-kinds", "att_x,mlp_x")],
                  done=complete(drift / "manifest.json"), part="drift rows")
        study.run(name, "analysis", [run.drift(drift)], done=False, part="drift")
        shutil.rmtree(drift)
    return []


def keep_collection_record(data: Path, folder: Path, groups: list[range], lookback: int) -> None:
    """The last group's collection manifest, kept as the record of what was collected (the report's collection),
    with every group's collected layers."""
    manifest = read_json(data / "manifest.json")
    manifest["online_groups"] = [[max(g[0] - lookback, 0), g[-1]] for g in groups]
    folder.mkdir(parents=True, exist_ok=True)  # with one group, no earlier group's marker has made it
    write_json_atomic(folder / "manifest.json", manifest)


def clear_other_collection(data: Path, layers: list[int]) -> None:
    """Remove an online collection of other layers (a run stopped in another group); one of these layers resumes."""
    manifest = data / "manifest.json"
    if data.exists() and (not manifest.is_file() or read_json(manifest).get("collected_layers") != layers):
        shutil.rmtree(data)


def online_groups(a: argparse.Namespace, model: ModelSpec, num_layers: int) -> list[range]:
    """The layer groups of the online path (plan.layer_groups over the collected bytes of one layer), checked against
    the free space of --online-dir (the largest group, or the drift rows)."""
    facts = model_facts(model.name, source_config(model))
    lookback = input_lookback(a.predictor_input, num_layers)
    groups = layer_groups(num_layers, layer_collection_bytes(facts.dims, a.collect_tokens, facts.gated),
                          int(a.memory_budget_gb * 2**30), lookback)
    if not groups:
        raise SystemExit(f"{model.name}: --memory-budget-gb {a.memory_budget_gb:g} holds not one online layer group "
                         f"(see --plan): raise it or lower --collect-tokens")
    group = max(collection_bytes(facts.dims, a.collect_tokens, facts.gated, len(g) + min(g[0], lookback))
                for g in groups)
    drift = 2 * FLOAT16 * facts.dims.hidden_size * num_layers * a.drift_rows  # att_x and mlp_x of every layer
    earlier = sum(f.stat().st_size for d in (f"{model.name}_c4", f"{model.name}_drift")
                  for f in (a.online_dir / d).glob("*") if f.is_file())  # a stopped run's collection, replaced
    need, free = max(group, drift), free_disk(a.online_dir) + earlier
    if need > free:
        raise SystemExit(f"{model.name}: an online group needs {gib(need)} ({need:,} bytes) in {a.online_dir}, which "
                         f"has {gib(free)} free: lower --memory-budget-gb (or --drift-rows) or give --online-dir")
    return groups


class BudgetFolders:
    """Per-budget predictors (SPEC §7): for every fraction k of --mlp-budgets / --att-budgets, <root>/b{k}/ holds the
    MLP predictors trained on the top-k label and the attention predictors trained on the top fraction_count(k, heads)
    heads, both from --predictor-input, and the static rankings at k; <root>/groups_b{k}/ the attention predictors and
    static rankings of whole key/value groups (models with GQA)."""

    def __init__(self, root: Path, a: argparse.Namespace):
        self.root, self.a = root, a
        self.heads, self.groups = str(root / "b{k}"), str(root / "groups_b{k}")

    def fractions(self, budgets: list[str]) -> list[str]:
        """The fractions among the budgets, named as the trainer names its folders (counts get no predictors)."""
        return [budget_name(b) for b in budgets if isinstance(parse_budget(b), float)]

    def complete(self, converted: Path, num_layers: int) -> bool:
        """Every folder has its blocks' summaries and the static ranking of the last layer (written last)."""
        last = num_layers - 1
        needed = [Path(self.heads.format(k=k)) / f"{f}" for k in self.fractions(self.a.mlp_budgets)
                  for f in ("mlp_summary.csv", f"static_mlp_layer{last}.json")]
        needed += [Path(self.heads.format(k=k)) / f for k in self.fractions(self.a.att_budgets)
                   for f in ("att_summary.csv", f"static_att_layer{last}.json")]
        if has_groups(converted):
            needed += [Path(self.groups.format(k=k)) / f for k in self.fractions(self.a.att_budgets)
                       for f in ("att_summary.csv", f"static_att_layer{last}.json")]
        return all(path.is_file() for path in needed)


def has_groups(converted: Path) -> bool:
    config = read_json(converted / "config.json")
    return config.get("num_key_value_heads", config["num_attention_heads"]) < config["num_attention_heads"]


def predictor_commands(a: argparse.Namespace, family: str, data: Path, budgets: BudgetFolders, training: list,
                       layers: list[int]) -> list[list[str]]:
    """Every block's predictors of `layers` at all budgets trained together (the run_c4_*.sh scripts: one pass over a
    layer's rows for all fractions, layers spread over --jobs processes, a summary per folder of every layer trained
    there so far), then the static rankings."""
    suffix = "_llama" if family == "llama" else ""
    mlp_k, att_k = ",".join(budgets.fractions(a.mlp_budgets)), ",".join(budgets.fractions(a.att_budgets))
    groups = family == "llama" and has_groups_data(data)

    def launch(block: str, k: str, folder: str, extra: list) -> list:
        env = {"DATA_DIR": data, "OUT_DIR": folder, "LOG_DIR": budgets.root / "logs" / Path(folder).name,
               "MODEL": data.name.removesuffix("_c4"), "SEEDS": 1, "LABEL": "topk", "JOBS_PER_GPU": a.jobs,
               "LAYERS_PER_JOB": -(-len(layers) // a.jobs), "LAYERS": layer_text(layers),
               "EXTRA_ARGS": shlex.join(map(str, ["--k", k, "--input", a.predictor_input, *training,
                                                  "--save-dtype", a.predictor_dtype, *extra]))}
        return ["env", *(f"{key}={value}" for key, value in env.items()), "bash",
                REPO / f"sparse_predictor/run_c4_{block}{suffix}.sh"]

    commands = [launch("mlp", mlp_k, budgets.heads, [])] if mlp_k else []
    commands += [launch("att", att_k, budgets.heads, [])] if att_k else []
    commands += [launch("att", att_k, budgets.groups, ["--gqa-groups"])] if att_k and groups else []
    device = ["--device", "cuda:0" if a.device == "cuda" else "cpu"]
    for block, k, folder, extra in (("mlp", mlp_k, budgets.heads, []), ("att", att_k, budgets.heads, []),
                                    *([("att", att_k, budgets.groups, ["--gqa-groups"])] if groups else [])):
        commands += [python("sparse_predictor/static_topk.py", "--data-dir", data, "--block", block, "--k", k, *extra,
                            "--L", layer_text(layers), "--out-dir", folder, *device)] if k else []
    return commands


def has_groups_data(data: Path) -> bool:
    dims = read_json(data / "manifest.json")["config"]
    return dims["num_kv_heads"] < dims["num_heads"]


def sweep_flags(a: argparse.Namespace, budgets: BudgetFolders, converted: Path, modes: list[str],
                blocks: list[str]) -> list:
    """The flags the perplexity and task sweeps share: modes, blocks, budgets, per-budget predictor folders, wiring."""
    units = ["heads", "groups"] if has_groups(converted) else ["heads"]
    return ["--modes", *modes, "--blocks", *blocks, "--mlp-topk", *a.mlp_budgets, "--att-topk", *a.att_budgets,
            "--att-units", *units, "--predictor-dir", budgets.heads, "--group-predictor-dir", budgets.groups,
            "--predictor-input", a.predictor_input, "--dense-layers", a.dense_layers]


def source_config(model: ModelSpec):
    """The model's transformers config before any conversion (converted or HF directory, GGUF file or hub id)."""
    from transformers import AutoConfig

    if model.is_gguf:
        return AutoConfig.from_pretrained(Path(model.source).parent, gguf_file=Path(model.source).name)
    return AutoConfig.from_pretrained(model.source)


def study_plan(args: argparse.Namespace) -> list:
    """Print what the study needs per model and in total (scripts/study/plan.py); returns the per-model plans."""
    fractions = [float(b) for b in args.mlp_budgets if isinstance(parse_budget(b), float)]
    rates = measured_rates()
    plans = []
    for model in args.models:
        config = source_config(model)
        facts = model_facts(model.name, config)
        gated = module_family(config.model_type, model.source) == "llama"
        units = ["heads", "groups"] if facts.dims.num_kv_heads < facts.dims.num_heads else ["heads"]
        settings = 2 * len(plan_settings(args.modes, args.mlp_budgets, args.att_budgets, args.blocks, units, gated))
        task_settings = len(plan_settings(args.task_modes or args.modes, args.mlp_budgets, args.att_budgets,
                                          args.task_blocks or args.blocks, units, gated)) if args.tasks else 0
        plans.append(plan_model(facts, args, fractions, settings, rates,
                                input_lookback(args.predictor_input, facts.dims.num_layers), task_settings,
                                documents_per_setting(args.task_limit) if task_settings else 0))
    print("\n".join(line for p in plans for line in p.lines))
    free = free_disk(args.out_dir)
    print(f"total: mmap path {gib(sum(p.mmap_bytes for p in plans))}, online path "
          f"{gib(sum(p.online_bytes for p in plans))} of disk; {gib(free)} free under {args.out_dir}")
    return plans


CURVE_FLAGS = ("folds", "fold_layers", "capacity_layers", "capacity_widths", "capacity_rows")


def summary_curve_flags(a: argparse.Namespace) -> list[str]:
    """The capacity, data-curve and fold flags given to the study, passed on to recall_summary.py as given."""
    return [part for name in CURVE_FLAGS if getattr(a, name) is not None
            for part in (f"--{name.replace('_', '-')}", str(getattr(a, name)))]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", type=parse_model, metavar="MODEL", help="SOURCE or NAME=SOURCE (see above)")
    p.add_argument("--out-dir", type=Path, required=True, help="everything the study writes")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where every stage runs (default cpu)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="compute dtype of collection and sparse inference (default fp32)")
    p.add_argument("--hub", action="store_true", help="C4 and WikiText-2 from the hub instead of the bundled files")
    p.add_argument("--c4-train-file", default=str(REPO / "data/samples/c4_train_1k.jsonl"),
                   help="C4 train documents to collect on (default: the bundled 1,000 real C4 train documents)")
    p.add_argument("--c4-val-file", default=str(REPO / "data/samples/c4_validation_2k.parquet"),
                   help="C4 validation documents to score (default: the bundled 2,000)")
    p.add_argument("--train-docs", type=int, default=500, help="C4 train documents requested (default %(default)s)")
    p.add_argument("--val-docs", type=int, default=200, help="C4 validation documents scored (default %(default)s)")
    p.add_argument("--wiki-windows", type=int, default=64,
                   help="first WikiText-2 windows scored; 0 = all (default %(default)s)")
    p.add_argument("--max-seq-len", type=int, default=1024, help="tokens per document / window (default %(default)s)")
    p.add_argument("--collect-tokens", type=int, default=200_000, help="rows collected (default %(default)s)")
    p.add_argument("--batch", type=int, default=8, help="requests per forward batch (default %(default)s)")
    p.add_argument("--epochs", type=int, default=20, help="predictor epochs (default %(default)s)")
    p.add_argument("--D", type=int, default=1000, help="predictor rank (default %(default)s)")
    p.add_argument("--seeds", type=int, default=1,
                   help="training seeds of every predictor (default %(default)s: the report's training-sample "
                        "interval is the spread over folds of the training documents, --folds; more seeds add the "
                        "seed spread at that many times the training cost)")
    p.add_argument("--selection", choices=("last", "original"), default="last",
                   help="which epoch is kept: last (default: nothing chosen on the held-out split) or original "
                        "(DejaVu's best held-out Recall, which favours predicting many units)")
    p.add_argument("--mlp-budgets", nargs="+", default=["0.1", "0.25", "0.5", "0.75", "0.9"],
                   help="MLP budgets of the sweep and the tasks: fractions of the neurons (predictors are trained at "
                        "each), or counts (default 0.1 0.25 0.5 0.75 0.9: the useful range, where the headline's "
                        "1%% and 5%% losses are read)")
    p.add_argument("--att-budgets", nargs="+", default=None,
                   help="attention budgets: fractions of each model's query heads, turned into counts by the one count "
                        "rule (predictors trained at each), or counts; paired with --mlp-budgets in the 'both' rows "
                        "(default: the MLP fractions)")
    p.add_argument("--modes", nargs="+", choices=STUDY_MODES, default=list(STUDY_MODES),
                   help="sparse modes of the sweep and the tasks (default all: %(default)s; gate runs on gated MLPs)")
    p.add_argument("--blocks", nargs="+", choices=SWEEP_BLOCKS, default=list(SWEEP_BLOCKS),
                   help="sweep rows: mlp only, att only, both paired (default all)")
    p.add_argument("--task-modes", nargs="+", choices=STUDY_MODES, default=None,
                   help="modes of the tasks stage (default: --modes)")
    p.add_argument("--task-blocks", nargs="+", choices=SWEEP_BLOCKS, default=None,
                   help="rows of the tasks stage (default: --blocks)")
    p.add_argument("--predictor-input", default="lookahead", choices=("lookahead", "same"),
                   help="the predictors' input: lookahead (DejaVu's deployed wiring: MLP of layer l from att_x_l, "
                        "attention from att_x_{l-1}; default) or same (mlp_x_l, att_x_l)")
    p.add_argument("--predictor-dtype", default="float32", choices=("float32", "bfloat16"),
                   help="dtype of the per-budget predictor checkpoints the sweeps load (default %(default)s); "
                        "bfloat16 halves their disk (--plan prints it); their JSONs keep the float32 predictor's "
                        "metrics and say so")
    p.add_argument("--dense-layers", default=DEFAULT_DENSE_LAYERS,
                   help="layers kept dense in every sparse mode, or 'none' (default %(default)s: no earlier input "
                        "exists for layer 0's lookahead)")
    p.add_argument("--tasks", default=",".join(DEJAVU_TASKS),
                   help="lm-evaluation-harness tasks of the 'tasks' stage, comma-separated (default: DejaVu's seven "
                        "over the bundled splits, the harness's own task definitions: %(default)s; with hub access "
                        "cb,copa,lambada_openai,openbookqa,piqa,rte,winogrande are the harness's hub tasks unchanged; "
                        "dejavu_wikitext2_lastword_mc,dejavu_wikitext2_lastword the WikiText-2 test task; '' leaves "
                        "the stage out)")
    p.add_argument("--task-jobs", type=at_least_one, default=1,
                   help="task_sweep.py processes sharing the GPU in the tasks stage, each over every N-th setting "
                        "(--shard), then one that writes the table (default %(default)s; a small model leaves the "
                        "GPU idle between batches)")
    p.add_argument("--task-batch", type=int, default=None,
                   help="requests per forward batch in the tasks stage (default: --batch)")
    p.add_argument("--task-limit", type=int, default=None,
                   help="first N documents of each task (default: all, the full splits)")
    p.add_argument("--num-fewshot", type=int, default=0,
                   help="few-shot examples per prompt (default 0; the local tasks draw them from the scored split, "
                        "never the document itself)")
    p.add_argument("--bootstrap-iters", type=int, default=100000,
                   help="task_sweep.py --bootstrap-iters: draws for the standard error of non-mean metrics such as "
                        "the last-word perplexity (acc's is closed-form; default %(default)s, the harness's)")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.25, 0.5],
                   help="K of the summary's Recall@K, fractions of the units (default 0.1 0.25 0.5)")
    p.add_argument("--distance-fraction", type=float, default=0.25,
                   help="K of the summary's predictors trained from l-1 and l-2 (default %(default)s)")
    for flag, what in (("--folds", "retrain the lookahead predictors without each of this many folds of the "
                                   "training documents; 0 = none"),
                       ("--fold-layers", "layers of the folds: 'ends' (layer 1, middle, last), 'all' or a list"),
                       ("--capacity-layers", "layers of the capacity and data curves: 'ends', 'last', 'all', a list, or '' "
                                             "for none"),
                       ("--capacity-widths", "predictor widths D of the capacity curve, 'full' = min(d, out)"),
                       ("--capacity-rows", "shares of the training rows of the data curve")):
        p.add_argument(flag, default=None, help=f"recall_summary.py {flag}: {what} (default: recall_summary.py's)")
    p.add_argument("--drift-distance", type=int, default=4, help="drift.py --max-distance (default %(default)s)")
    p.add_argument("--massive-dims", type=int, default=4, help="drift.py --exclude-massive-dims (default %(default)s)")
    p.add_argument("--lookahead-distance", type=int, default=0,
                   help="also run lookahead.py up to this distance (the summary covers distances 0-2; default 0)")
    p.add_argument("--sweep-labels", default="relu,topk:0.25,threshold:0.01,gate",
                   help="sparsity_stats.py --labels, trained on the middle layer (default %(default)s)")
    p.add_argument("--jobs", type=int, default=2,
                   help="analysis commands at once, predictor jobs per GPU (or on the CPU) and summary workers "
                        "(default %(default)s)")
    p.add_argument("--note", action="append", default=[], help="a sentence for the top of the report (repeat)")
    p.add_argument("--plan", action="store_true",
                   help="print what the study needs (disk for the mmap and online paths, GPU memory per online layer "
                        "group and forward passes, host RAM, estimated time per stage from measured rates) and stop; "
                        "the plan is also checked before any collection: an mmap study the free disk cannot hold is "
                        "refused")
    p.add_argument("--memory-budget-gb", type=float, default=None,
                   help="GiB of collected rows one online layer group may hold in --online-dir, the earlier layers "
                        "its inputs read included: sets the groups, one forward pass each (default: 0.9 of the free "
                        "space of --online-dir when the study starts, printed; /dev/shm is usually half the host RAM)")
    p.add_argument("--collection", choices=("auto", "mmap", "online"), default="auto",
                   help="mmap: collect every layer into <out-dir>/data/<model>_c4/ and read it (as many bytes of disk "
                        "as --plan says); online: per layer group, collect only its layers (and the earlier ones its "
                        "inputs read) into --online-dir, run the stages that read activations on them, merge, delete, "
                        "and drift on a collection of the first --drift-rows rows: the same numbers, no activation "
                        "on the disk, one forward pass per group. auto (default): online when the mmap path needs "
                        "more disk than is free under --out-dir (the plan's check), else mmap, which collects once")
    p.add_argument("--online-dir", type=Path, default=None,
                   help=f"where the online path's group collections live while used (default: "
                        f"{ONLINE_TMPFS}/<model>_c4 when {ONLINE_TMPFS.parent} exists, RAM-backed, so the rows are in "
                        f"host RAM; else <out-dir>/online)")
    p.add_argument("--drift-rows", type=int, default=20_000,
                   help="drift.py --first-rows: drift over the collection's first N rows, on both paths (online: a "
                        "collection of att_x and mlp_x of every layer for these rows only; default %(default)s)")
    p.add_argument("--stages", type=stage_list, default=list(STAGES),
                   help=f"comma list of the stages to run, of {','.join(STAGES)} (default all); the others are "
                        "skipped, and a stage whose inputs an unrun stage makes fails naming the missing file")
    return p


def stage_list(text: str) -> list[str]:
    stages = [s.strip() for s in text.split(",") if s.strip()]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown or not stages:
        raise argparse.ArgumentTypeError(f"unknown stages {unknown} (known: {','.join(STAGES)})" if unknown
                                         else "no stage named")
    return stages


def interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> Path:
    # `timeout` and job schedulers stop with SIGTERM: resume cleanly. Restored at the end, so that a caller in the same
    # process (a test) does not keep it: forked children would inherit it (multiprocessing.Pool's terminate() sends
    # SIGTERM to its workers and then waits for them; a worker that catches it can hang the pool).
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        return run_all(build_parser().parse_args(argv))
    finally:
        signal.signal(signal.SIGTERM, previous)


def choose_collection(args: argparse.Namespace, plans: list) -> str:
    """--collection auto: online when the mmap path needs more disk than is free under --out-dir, else mmap."""
    if args.collection != "auto":
        return args.collection
    need, free = mmap_need_and_free(plans, args.out_dir)
    chosen = "online" if need > free else "mmap"
    print(f"--collection auto: {chosen} (the mmap path needs {gib(need)}, {gib(free)} free under {args.out_dir})")
    return chosen


def run_all(args: argparse.Namespace) -> Path:
    args.att_budgets = args.att_budgets or list(args.mlp_budgets)
    if len({m.name for m in args.models}) != len(args.models):
        raise SystemExit(f"model names must differ: {[m.name for m in args.models]}")
    args.online_dir = args.online_dir or (ONLINE_TMPFS if ONLINE_TMPFS.parent.is_dir() else args.out_dir / "online")
    if args.memory_budget_gb is None:
        args.memory_budget_gb = round(0.9 * free_disk(args.online_dir) / 2**30, 1)
        print(f"--memory-budget-gb {args.memory_budget_gb:g}: 0.9 of the free space of {args.online_dir}")
    if args.plan or "collect" in args.stages or args.collection == "auto":
        plans = study_plan(args)
        if args.plan:
            return args.out_dir
        args.collection = choose_collection(args, plans)
        if "collect" in args.stages and args.collection == "mmap" and any(
                not complete(args.out_dir / "data" / f"{m.name}_c4" / "manifest.json") for m in args.models):
            check_disk(plans, args.out_dir)
    study = Study(args)
    train, val = study_requests(study)
    tasks = local_tasks(study)
    inputs = []
    for model in args.models:
        inputs += study_model(study, model, train, val, tasks)
    report_dir = args.out_dir / "report"
    if "report" not in args.stages:
        print(f"study done in {time.time() - study.started:.0f} s (stages {','.join(args.stages)}; no report)")
        return report_dir / "report.md"
    notes = [*args.note, f"Study command: `{shlex.join(sys.argv)}`"]
    study.run("all", "report", [python("scripts/report/report.py", *inputs, study.manifest_path, "--out-dir", report_dir,
                                       *[x for n in notes for x in ("--note", n)])], done=False)
    print(f"study done in {time.time() - study.started:.0f} s: report at {report_dir / 'report.md'}")
    return report_dir / "report.md"


if __name__ == "__main__":
    main()

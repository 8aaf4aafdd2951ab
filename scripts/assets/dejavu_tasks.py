"""DejaVu's seven downstream tasks (CB, COPA, RTE, Winogrande, PIQA, OpenBookQA, LAMBADA) as local
lm-evaluation-harness tasks over the bundled evaluation splits in data/tasks/ (PROVENANCE.md there).

Each local task is the harness's own: its YAML `include:`s the installed harness's built-in YAML of the task (prompt,
doc_to_text / doc_to_choice / doc_to_target and their utility functions, output type, metrics) and overrides only where
the documents come from: the harness's local `json` dataset path, one file, the split the built-in task evaluates, no
training split. The documents are written in the Hugging Face field layout that built-in task reads:

    local task              built-in task (YAML in lm_eval/tasks/)    split scored   from data/tasks/, mapped
    dejavu_cb               cb (super_glue/cb)                        validation     as is
    dejavu_copa             copa (super_glue/copa)                    validation     as is
    dejavu_rte              sglue_rte (super_glue/rte); the hub's     validation     as is
                            `rte` (glue/rte) builds the same requests
    dejavu_winogrande       winogrande (winogrande, xl)               validation     qID dropped, answer a string
    dejavu_piqa             piqa                                      validation     label from valid-labels.lst
    dejavu_openbookqa       openbookqa (main)                         test           question.stem -> question_stem,
                                                                                     choices -> {text: [], label: []}
    dejavu_lambada_openai   lambada_openai                            test           as is

and the group `dejavu_tasks` runs all seven (its acc is the unweighted mean over tasks, as the paper reports).
Few-shot (--num_fewshot N, default 0): the local files have no training split, so the harness draws the examples from
the scored split itself, never the scored document (the hub tasks draw from train where there is one).

Every file of data/tasks/ is checked against the committed data/tasks/SHA256SUMS before it is read, and the written
files against the manifest before an evaluation (verify_task_folder); a changed file is an error naming it.
scripts/assets/make_local_task.py writes these tasks with the WikiText-2 test task into one --include_path folder.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from Decentralized_FM_alpha.utils.manifest import file_sha256, read_json  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DATA_DIR = REPO / "data/tasks"
CHECKSUMS = "SHA256SUMS"
GROUP = "dejavu_tasks"
MANIFEST_KEY = "dejavu_tasks"  # the entry of the task folder's task_manifest.json
SPLITS = ("training_split", "validation_split", "test_split")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def pick(rows: list[dict], fields: tuple[str, ...], path: Path) -> list[dict]:
    """The given fields of every row, in that order; a row without one is an error naming the file and line."""
    picked = []
    for number, row in enumerate(rows, 1):
        missing = [f for f in fields if f not in row]
        if missing:
            raise ValueError(f"{path}: line {number} has no field {missing} (fields: {sorted(row)})")
        picked.append({f: row[f] for f in fields})
    return picked


def superglue_pairs(paths: list[Path]) -> list[dict]:
    """CB and RTE: HF super_glue's premise, hypothesis, idx, label (the files' own layout)."""
    return pick(read_jsonl(paths[0]), ("premise", "hypothesis", "idx", "label"), paths[0])


def copa_documents(paths: list[Path]) -> list[dict]:
    return pick(read_jsonl(paths[0]), ("premise", "choice1", "choice2", "question", "idx", "label"), paths[0])


def winogrande_documents(paths: list[Path]) -> list[dict]:
    """HF allenai/winogrande: sentence, option1, option2, answer as the string "1" or "2"."""
    documents = pick(read_jsonl(paths[0]), ("sentence", "option1", "option2", "answer"), paths[0])
    for number, doc in enumerate(documents, 1):
        doc["answer"] = str(doc["answer"])
        if doc["answer"] not in ("1", "2"):
            raise ValueError(f"{paths[0]}: line {number} answer {doc['answer']!r} is neither 1 nor 2")
    return documents


def piqa_documents(paths: list[Path]) -> list[dict]:
    """HF piqa: goal, sol1, sol2 and the integer label, which the original release keeps one a line in a second file."""
    questions, labels_path = read_jsonl(paths[0]), paths[1]
    labels = labels_path.read_text(encoding="utf-8").split()
    if len(labels) != len(questions) or not set(labels) <= {"0", "1"}:
        raise ValueError(f"{labels_path}: {len(labels)} labels of {sorted(set(labels))} for the {len(questions)} "
                         f"questions of {paths[0]} (one 0 or 1 a question expected)")
    return [{**doc, "label": int(label)}
            for doc, label in zip(pick(questions, ("goal", "sol1", "sol2"), paths[0]), labels)]


def openbookqa_documents(paths: list[Path]) -> list[dict]:
    """HF allenai/openbookqa (main): id, question_stem, choices {text, label} as two lists, answerKey."""
    documents = []
    for row in pick(read_jsonl(paths[0]), ("id", "question", "answerKey"), paths[0]):
        choices = row["question"]["choices"]
        documents.append({"id": row["id"], "question_stem": row["question"]["stem"],
                          "choices": {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]},
                          "answerKey": row["answerKey"]})
    return documents


def lambada_documents(paths: list[Path]) -> list[dict]:
    return pick(read_jsonl(paths[0]), ("text",), paths[0])


@dataclass(frozen=True)
class LocalTask:
    name: str                      # the local task's name
    builtin: str                   # the harness's task it reproduces
    builtin_yaml: str              # that task's YAML, relative to lm_eval/tasks/
    split: str                     # the split key the built-in task scores: validation_split or test_split
    sources: tuple[str, ...]       # its files, relative to data/tasks/
    documents: Callable[[list[Path]], list[dict]]  # the files -> documents in the Hugging Face field layout

    @property
    def data_file(self) -> str:
        return f"{self.name}.jsonl"


TASKS = (
    LocalTask("dejavu_cb", "cb", "super_glue/cb/default.yaml", "validation_split",
              ("cb/cb_validation.jsonl",), superglue_pairs),
    LocalTask("dejavu_copa", "copa", "super_glue/copa/default.yaml", "validation_split",
              ("copa/copa_validation.jsonl",), copa_documents),
    LocalTask("dejavu_rte", "sglue_rte", "super_glue/rte/default.yaml", "validation_split",
              ("rte/rte_validation.jsonl",), superglue_pairs),
    LocalTask("dejavu_winogrande", "winogrande", "winogrande/default.yaml", "validation_split",
              ("winogrande/dev.jsonl",), winogrande_documents),
    LocalTask("dejavu_piqa", "piqa", "piqa/piqa.yaml", "validation_split",
              ("piqa/valid.jsonl", "piqa/valid-labels.lst"), piqa_documents),
    LocalTask("dejavu_openbookqa", "openbookqa", "openbookqa/openbookqa.yaml", "test_split",
              ("openbookqa/test.jsonl",), openbookqa_documents),
    LocalTask("dejavu_lambada_openai", "lambada_openai", "lambada/lambada_openai.yaml", "test_split",
              ("lambada/lambada_test.jsonl",), lambada_documents),
)
TASK_NAMES = tuple(t.name for t in TASKS)
BY_NAME = {t.name: t for t in TASKS}


def harness_tasks_dir() -> Path:
    import lm_eval

    return Path(lm_eval.__file__).resolve().parent / "tasks"


def checksums(data_dir: Path) -> dict[str, str]:
    """{path relative to data_dir: sha256} from data_dir/SHA256SUMS (sha256sum's format)."""
    sums = data_dir / CHECKSUMS
    if not sums.is_file():
        raise FileNotFoundError(f"{sums}: no checksum file (the committed data/tasks/{CHECKSUMS})")
    found = {}
    for number, line in enumerate(sums.read_text().splitlines(), 1):
        digest, _, name = line.strip().partition("  ")
        if len(digest) != 64 or not name:
            raise ValueError(f"{sums}: line {number} is not '<sha256>  <path>': {line!r}")
        found[os.path.normpath(name)] = digest
    return found


def verify_files(data_dir: Path, names: list[str]) -> dict[str, str]:
    """sha256 of each named file, equal to SHA256SUMS's, else an error naming the file and both checksums."""
    expected = checksums(data_dir)
    verified = {}
    for name in names:
        path = data_dir / name
        if name not in expected:
            raise ValueError(f"{path}: not listed in {data_dir / CHECKSUMS}")
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing (listed in {data_dir / CHECKSUMS})")
        digest = file_sha256(path)
        if digest != expected[name]:
            raise ValueError(f"{path}: sha256 {digest} differs from {expected[name]} in {data_dir / CHECKSUMS}; "
                             f"the file changed")
        verified[name] = digest
    return verified


def hf_documents(task: LocalTask, data_dir: Path = DATA_DIR) -> list[dict]:
    """The task's documents in the Hugging Face field layout, from checksum-verified files."""
    verify_files(data_dir, list(task.sources))
    return task.documents([data_dir / name for name in task.sources])


def task_yaml(task: LocalTask, data_file: Path, harness_dir: Path) -> str:
    """The built-in YAML included, its data replaced by the one local file as the split it scores."""
    splits = "".join(f"{key}: {task.split.removesuffix('_split') if key == task.split else 'null'}\n"
                     for key in SPLITS)
    return (f"include: {json.dumps(str(harness_dir / task.builtin_yaml))}\n"
            f"task: {task.name}\ntag: []\ndataset_path: json\ndataset_name: null\n"
            f"dataset_kwargs:\n  data_files:\n    {task.split.removesuffix('_split')}: {json.dumps(str(data_file))}\n"
            f"{splits}fewshot_split: null\n")


def group_yaml() -> str:
    return (f"group: {GROUP}\ntask:\n" + "".join(f"  - {name}\n" for name in TASK_NAMES)
            + "aggregate_metric_list:\n  - metric: acc\n    aggregation: mean\n    weight_by_size: false\n"
            + "metadata:\n  version: 1.0\n")


def write_tasks(out_dir: Path, data_dir: Path = DATA_DIR) -> dict:
    """Writes the seven tasks' documents and YAMLs and the group's YAML into out_dir; returns what the task manifest
    records (checksums of every source and written file, the built-in YAMLs and the harness version)."""
    import importlib.metadata

    harness_dir = harness_tasks_dir()
    out_dir = out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks = {}
    for task in TASKS:
        documents = hf_documents(task, data_dir)
        data_file = out_dir / task.data_file
        data_file.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in documents), encoding="utf-8")
        (out_dir / f"{task.name}.yaml").write_text(task_yaml(task, data_file, harness_dir), encoding="utf-8")
        tasks[task.name] = {"builtin": task.builtin, "builtin_yaml": str(harness_dir / task.builtin_yaml),
                            "builtin_yaml_sha256": file_sha256(harness_dir / task.builtin_yaml),
                            "split": task.split.removesuffix("_split"), "documents": len(documents),
                            "data_file": str(data_file), "data_sha256": file_sha256(data_file),
                            "sources": {name: file_sha256(data_dir / name) for name in task.sources}}
    (out_dir / f"{GROUP}.yaml").write_text(group_yaml(), encoding="utf-8")
    return {"group": GROUP, "data_dir": str(data_dir.resolve()), "harness": importlib.metadata.version("lm_eval"),
            "tasks": tasks}


def verify_task_folder(folder: Path) -> None:
    """Before an evaluation: the folder's DejaVu tasks (when its task_manifest.json lists them) still read the files
    they were written from: the sources equal SHA256SUMS, the written documents their recorded checksums."""
    manifest = Path(folder) / "task_manifest.json"
    if not manifest.is_file() or MANIFEST_KEY not in (written := read_json(manifest)):
        return
    entry = written[MANIFEST_KEY]
    data_dir = Path(entry["data_dir"])
    for name, task in entry["tasks"].items():
        sources = verify_files(data_dir, list(task["sources"]))
        if sources != task["sources"]:
            raise ValueError(f"{name}: the sources in {data_dir} changed since {folder} was written "
                             f"({sources} vs {task['sources']}); write the task folder again")
        digest = file_sha256(task["data_file"])
        if digest != task["data_sha256"]:
            raise ValueError(f"{task['data_file']}: sha256 {digest} differs from {task['data_sha256']} recorded in "
                             f"{manifest}; the file changed")


def documents_per_setting(limit: int | None, data_dir: Path = DATA_DIR) -> int:
    """Documents the seven tasks evaluate for one setting at this --limit (None: the full splits)."""
    return sum(len(docs) if limit is None else min(limit, len(docs))
               for docs in (hf_documents(task, data_dir) for task in TASKS))

"""The offline lm-evaluation-harness tasks in one folder: DejaVu's seven downstream tasks over the bundled evaluation
splits (scripts/assets/dejavu_tasks.py: cb, copa, rte, winogrande, piqa, openbookqa, lambada_openai as the harness
defines them, named dejavu_<task>, group dejavu_tasks) and a small test task from the bundled WikiText-2 text:
predict a sentence's last word.

The WikiText-2 task is a TEST TASK for exercising the harness without a hub, not LAMBADA: LAMBADA's passages were
chosen so that humans need the whole passage to guess the word; these are plain WikiText-2 sentences, where the last
word is often guessable from the sentence alone (or not at all). Use it to check the machinery and to compare modes
and budgets on one model, not to compare with published numbers.

Examples: body paragraphs of data/samples/wikitext2_test_joined.txt (headings and short lines skipped), in file order,
at most one per paragraph: the paragraph's first sentences, as many as fit in --max-words words, must end with
"<word> ." where <word> is alphabetic with at least --min-target-chars letters; context = the words before <word>,
target = <word>. The text keeps WikiText-2's tokenisation (" , ", " @-@ ") byte for byte.

Two tasks over the same examples, both reading the JSONL through the harness's local `json` dataset path:
  dejavu_wikitext2_lastword     output_type loglikelihood: acc = the target is the greedy continuation; perplexity
  dejavu_wikitext2_lastword_mc  output_type multiple_choice: the target vs --distractors other examples' targets
                                (seeded), acc and acc_norm
Writes into --out-dir (a folder for the harness's --include_path / task_sweep.py --include-path):
wikitext2_lastword.jsonl and dejavu_<task>.jsonl (the documents), one YAML per task and the group's (data files by
absolute path), task_manifest.json (the checksums of every source and written file).

    python scripts/assets/make_local_task.py --out-dir out/lm_eval_tasks
    python scripts/study/lm_eval_dejavu.py --model dejavu --model_args pretrained=DIR \\
        --include_path out/lm_eval_tasks --tasks dejavu_tasks --limit 50
    python scripts/study/lm_eval_dejavu.py --model dejavu --model_args pretrained=DIR \\
        --include_path out/lm_eval_tasks --tasks dejavu_wikitext2_lastword_mc,dejavu_wikitext2_lastword
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from Decentralized_FM_alpha.utils.manifest import base_manifest, file_sha256, write_json_atomic  # noqa: E402
from scripts.assets import dejavu_tasks  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DEFAULT_TEXT = REPO / "data/samples/wikitext2_test_joined.txt"
DATA_FILE = "wikitext2_lastword.jsonl"
LASTWORD, MULTIPLE_CHOICE = "dejavu_wikitext2_lastword", "dejavu_wikitext2_lastword_mc"
LOCAL_TASKS = (MULTIPLE_CHOICE, LASTWORD)


def paragraph_example(paragraph: str, max_words: int, min_target_chars: int) -> tuple[str, str] | None:
    """(context, target) from the longest run of whole first sentences within max_words, or None."""
    words = paragraph.split()
    ends = [i for i, w in enumerate(words) if w == "." and i < max_words]  # sentence ends " ." that fit
    for end in reversed(ends):
        target = words[end - 1] if end >= 2 else ""
        if target.isalpha() and len(target) >= min_target_chars:
            return " ".join(words[: end - 1]), target
    return None


def build_examples(text: str, count: int, max_words: int, min_target_chars: int, distractors: int,
                   seed: int) -> list[dict]:
    found = []
    for number, line in enumerate(text.split("\n")):
        paragraph = line.strip()
        if not paragraph or paragraph.startswith("=") or len(paragraph.split()) < 8:
            continue
        example = paragraph_example(paragraph, max_words, min_target_chars)
        if example is not None:
            found.append({"context": example[0], "target": example[1], "line": number})
        if len(found) == count:
            break
    if len(found) < count:
        raise SystemExit(f"only {len(found)} examples found, {count} asked for (--num-examples)")
    rng = random.Random(seed)
    targets = sorted({e["target"] for e in found})
    for e in found:
        others = rng.sample([t for t in targets if t != e["target"]], distractors)
        choices = others + [e["target"]]
        rng.shuffle(choices)
        e["choices"], e["label"] = choices, choices.index(e["target"])
    return found


def task_yaml(task: str, data_file: Path) -> str:
    common = (f"task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
              f"    test: {json.dumps(str(data_file))}\ntest_split: test\ndoc_to_text: \"{{{{context}}}}\"\n")
    if task == LASTWORD:
        return common + ("output_type: loglikelihood\ndoc_to_target: \"{{' ' + target}}\"\nmetric_list:\n"
                         "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
                         "  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n"
                         "metadata:\n  version: 1.0\n")
    return common + ("output_type: multiple_choice\ndoc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{label}}\"\n"
                     "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
                     "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
                     "metadata:\n  version: 1.0\n")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", type=Path, required=True, help="task folder to write (for --include_path)")
    p.add_argument("--task-data", type=Path, default=dejavu_tasks.DATA_DIR,
                   help="DejaVu's task splits with their SHA256SUMS (default: the bundled data/tasks)")
    p.add_argument("--text", type=Path, default=DEFAULT_TEXT,
                   help="WikiText-2 text (default: the bundled data/samples/wikitext2_test_joined.txt)")
    p.add_argument("--num-examples", type=int, default=200, help="examples, one per paragraph (default %(default)s)")
    p.add_argument("--max-words", type=int, default=48, help="longest passage in words (default %(default)s)")
    p.add_argument("--min-target-chars", type=int, default=3, help="shortest target word (default %(default)s)")
    p.add_argument("--distractors", type=int, default=3,
                   help="wrong choices of the multiple-choice task (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the distractors and their order (default 0)")
    return p.parse_args(argv)


def main(argv=None) -> Path:
    args = parse_args(argv)
    if not args.text.is_file():
        raise SystemExit(f"text file not found: {args.text}")
    examples = build_examples(args.text.read_text(encoding="utf-8"), args.num_examples, args.max_words,
                              args.min_target_chars, args.distractors, args.seed)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    data_file = (args.out_dir / DATA_FILE).resolve()
    data_file.write_text("".join(json.dumps(e) + "\n" for e in examples), encoding="utf-8")
    for task in LOCAL_TASKS:
        (args.out_dir / f"{task}.yaml").write_text(task_yaml(task, data_file), encoding="utf-8")
    dejavu = dejavu_tasks.write_tasks(args.out_dir, args.task_data)
    write_json_atomic(args.out_dir / "task_manifest.json", base_manifest(
        kind="local_task", tasks=[*LOCAL_TASKS, *dejavu_tasks.TASK_NAMES], groups=[dejavu_tasks.GROUP],
        **{dejavu_tasks.MANIFEST_KEY: dejavu}, examples=len(examples), data_file=str(data_file),
        data_sha256=file_sha256(data_file), source={"path": str(args.text.resolve()), "sha256": file_sha256(args.text)},
        settings={k: str(v) for k, v in vars(args).items()},
        note="a test task built from WikiText-2 sentences, not LAMBADA"))
    counts = ", ".join(f"{name} ({task['documents']})" for name, task in dejavu["tasks"].items())
    print(f"wrote {len(examples)} examples and tasks {', '.join(LOCAL_TASKS)}; DejaVu's {counts}, group "
          f"{dejavu_tasks.GROUP} -> {args.out_dir}")
    return args.out_dir


if __name__ == "__main__":
    main()

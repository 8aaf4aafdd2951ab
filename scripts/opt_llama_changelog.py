"""The OPT -> Llama change log: a unified diff of every OPT/Llama twin file (SPEC §1), in one markdown file.

Each Llama file mirrors its OPT twin one-for-one, so the diff of a pair *is* the change the architecture needs.
For every pair this writes a one-line summary (lines added / removed; for Python, the functions and classes
that differ: only in OPT, only in Llama, or changed) and the full diff, to docs/CHANGES_OPT_TO_LLAMA.md.
A twin not written yet is listed as missing. The output holds no date or commit, so it changes only when a
twin changes; tests/test_analysis.py fails when the committed file is out of date.

    python scripts/opt_llama_changelog.py            # regenerate after editing a twin
    python scripts/opt_llama_changelog.py --check    # exit 1 if the committed file differs from a regeneration
"""
from __future__ import annotations

import argparse
import ast
import difflib
import sys
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
OUTPUT = Path("docs/CHANGES_OPT_TO_LLAMA.md")
MODULES = "Decentralized_FM_alpha/modules"
# The twins SPEC §1 names (OPT first), then the run scripts; run_infer_llama_3b_<x>.sh pairs with
# run_infer_opt_125m_<x>.sh, found by name so that a new run script joins the log.
TWIN_PAIRS = (
    (f"{MODULES}/hf_opt_module.py", f"{MODULES}/hf_llama_module.py"),
    (f"{MODULES}/hf_opt_module_save.py", f"{MODULES}/hf_llama_module_save.py"),
    (f"{MODULES}/hf_opt_sparse_mlp_attention.py", f"{MODULES}/hf_llama_sparse_mlp_attention.py"),
    ("Decentralized_FM_alpha/convert_opt_checkpoint.py", "Decentralized_FM_alpha/convert_llama_checkpoint.py"),
    ("sparse_predictor/main_mlp.py", "sparse_predictor/main_mlp_llama.py"),
    ("sparse_predictor/main_att.py", "sparse_predictor/main_att_llama.py"),
    ("sparse_predictor/run_c4_mlp.sh", "sparse_predictor/run_c4_mlp_llama.sh"),
    ("sparse_predictor/run_c4_att.sh", "sparse_predictor/run_c4_att_llama.sh"),
    ("Decentralized_FM_alpha/run_infer_opt_125m_collect_sp_data.sh",
     "Decentralized_FM_alpha/run_infer_llama_3b_collect_sp_data.sh"),
    ("Decentralized_FM_alpha/run_infer_opt_125m_c4_1gpu.sh", "Decentralized_FM_alpha/run_infer_llama_3b_c4_1gpu.sh"),
    ("Decentralized_FM_alpha/run_infer_opt_125m_c4_sparse.sh",
     "Decentralized_FM_alpha/run_infer_llama_3b_c4_sparse.sh"),
)
RUN_SCRIPT_TWINS = ("Decentralized_FM_alpha/run_infer_opt_125m_", "Decentralized_FM_alpha/run_infer_llama_3b_")


def twin_pairs(root: Path = REPO_ROOT) -> list[tuple[str, str]]:
    """TWIN_PAIRS plus every Llama run script whose OPT twin name follows RUN_SCRIPT_TWINS."""
    pairs = list(TWIN_PAIRS)
    opt_prefix, llama_prefix = RUN_SCRIPT_TWINS
    for llama in sorted(root.glob(llama_prefix + "*.sh")):
        llama_rel = llama.relative_to(root).as_posix()
        pair = (opt_prefix + llama_rel[len(llama_prefix):], llama_rel)
        if pair not in pairs:
            pairs.append(pair)
    return pairs


# ------------------------------------------------------------------------------------- one pair
DEFINITIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
MODULE_LEVEL = "(module level)"


def definitions(source: str) -> dict[str, str]:
    """Qualified name ('Class', 'Class.method', 'function', MODULE_LEVEL) -> its own source text.

    A class's own text leaves out its methods, and the module's own text (imports, constants, docstring) its
    top-level definitions, so that a change is named once, where it is.
    """
    tree = ast.parse(source)
    module_text = source
    for node in tree.body:
        if isinstance(node, DEFINITIONS):
            module_text = module_text.replace(ast.get_source_segment(source, node), "")
    found = {MODULE_LEVEL: without_blank_lines(module_text)}

    def visit(nodes: list[ast.stmt], prefix: str) -> None:
        for node in nodes:
            if isinstance(node, DEFINITIONS):
                name = prefix + node.name
                text = ast.get_source_segment(source, node)
                if isinstance(node, ast.ClassDef):
                    for child in node.body:
                        if isinstance(child, DEFINITIONS):
                            text = text.replace(ast.get_source_segment(source, child), "")
                    visit(node.body, name + ".")
                found[name] = without_blank_lines(text)

    visit(tree.body, "")
    return found


def without_blank_lines(text: str) -> str:
    """Text minus blank lines: removing a definition leaves blank lines that are no change of their own."""
    return "\n".join(line for line in text.splitlines() if line.strip())


def outermost(names: set[str]) -> tuple[str, ...]:
    """Names without those whose class is in the set too (a class only in one file lists just the class)."""
    return tuple(sorted(n for n in names if n.rpartition(".")[0] not in names))


@dataclass(frozen=True)
class PairChange:
    opt: str
    llama: str
    missing: tuple[str, ...]  # paths of the pair that do not exist
    added: int = 0
    removed: int = 0
    only_opt: tuple[str, ...] = ()
    only_llama: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    diff: str = ""

    def summary(self) -> str:
        if self.missing:
            return f"MISSING: {', '.join(self.missing)}"
        if not self.diff:
            return "identical"
        parts = [f"+{self.added} -{self.removed} lines"]
        if self.opt.endswith(".py"):
            parts += [f"{what}: {', '.join(names) or 'none'}" for what, names in
                      (("changed", self.changed), ("only in OPT", self.only_opt), ("only in Llama", self.only_llama))]
        return "; ".join(parts)


def compare_pair(opt_path: str, llama_path: str, root: Path = REPO_ROOT) -> PairChange:
    """Diff and summary of one twin pair; a missing file makes the pair 'missing' (no diff)."""
    missing = tuple(p for p in (opt_path, llama_path) if not (root / p).is_file())
    if missing:
        return PairChange(opt_path, llama_path, missing)
    opt_text, llama_text = (root / opt_path).read_text(), (root / llama_path).read_text()
    diff_lines = list(difflib.unified_diff(opt_text.splitlines(keepends=True), llama_text.splitlines(keepends=True),
                                           fromfile=f"a/{opt_path}", tofile=f"b/{llama_path}"))
    added = sum(1 for l in diff_lines if l.startswith("+") and not l.startswith("+++"))
    removed = sum(1 for l in diff_lines if l.startswith("-") and not l.startswith("---"))
    only_opt = only_llama = changed = ()
    if opt_path.endswith(".py"):
        opt_defs, llama_defs = definitions(opt_text), definitions(llama_text)
        only_opt = outermost(set(opt_defs) - set(llama_defs))
        only_llama = outermost(set(llama_defs) - set(opt_defs))
        changed = tuple(sorted(n for n in set(opt_defs) & set(llama_defs) if opt_defs[n] != llama_defs[n]))
    diff = "".join(l if l.endswith("\n") else l + "\n\\ No newline at end of file\n" for l in diff_lines)
    return PairChange(opt_path, llama_path, (), added, removed, only_opt, only_llama, changed, diff)


# ------------------------------------------------------------------------------------- the document
def collect_changes(root: Path = REPO_ROOT) -> list[PairChange]:
    return [compare_pair(opt, llama, root) for opt, llama in twin_pairs(root)]


def render_changelog(root: Path = REPO_ROOT) -> str:
    """The full markdown of docs/CHANGES_OPT_TO_LLAMA.md for the twin files as they are under `root`."""
    return render(collect_changes(root))


def render(changes: list[PairChange]) -> str:
    lines = ["# Changes from OPT to Llama", "",
             "Generated by `python scripts/opt_llama_changelog.py` from the OPT/Llama twin files (SPEC §1): each",
             "Llama file mirrors its OPT twin, so these diffs are the changes the architecture needs. Do not edit",
             "by hand; regenerate after editing a twin (the test suite fails while this file is out of date).", "",
             "## Summary", "", "| OPT file | Llama file | change |", "|---|---|---|"]
    lines += [f"| `{c.opt}` | `{c.llama}` | {c.summary()} |" for c in changes]
    for c in changes:
        lines += ["", f"## `{c.opt}` -> `{c.llama}`", "", c.summary()]
        if c.diff:
            lines += ["", "````diff", c.diff.rstrip("\n"), "````"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true",
                        help=f"write nothing; exit 1 if {OUTPUT} differs from what would be generated")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / OUTPUT,
                        help=f"where the change log goes (default {OUTPUT} in the repository)")
    args = parser.parse_args(argv)
    changes = collect_changes()
    text = render(changes)
    if args.check:
        current = args.output.read_text() if args.output.is_file() else None
        if current != text:
            print(f"{args.output} is out of date: run python scripts/opt_llama_changelog.py", file=sys.stderr)
            return 1
        print(f"{args.output} is up to date")
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    missing = sum(1 for c in changes if c.missing)
    print(f"wrote {args.output}: {len(changes)} OPT/Llama twin pairs, {missing} with a missing file")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The static top-K of every layer (SPEC §7): the K units most often in the true top-K over the training documents.

Per layer, each unit's count of training rows in which it is among the top fraction --k of the label (MLP: |mlp_label|;
attention: the head output norms), with the predictors' document split (the same --test-fraction / --test-docs), so
the held-out documents are never counted. The sparse runner's mode `static` keeps the K most counted units of every
token (ties by lower unit index); recall_summary.py scores the same ranking on the held-out documents.

    python sparse_predictor/static_topk.py --data-dir data/llama-3.2-3b_c4 --out-dir data/llama-3.2-3b_c4_static \\
        --block mlp --k 0.5
Writes <out-dir>/static_{block}_layer{L}.json per layer: counts (an int per unit), K, the split, provenance.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # lets `python sparse_predictor/<this file>` run

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from Decentralized_FM_alpha.utils.activation_store import ActivationStore  # noqa: E402
from Decentralized_FM_alpha.utils.manifest import base_manifest, now, write_json_atomic  # noqa: E402
from Decentralized_FM_alpha.utils.selection import COUNT_RULE  # noqa: E402
from sparse_predictor.trainer.cli import label_out_dirs, open_layers, resolve_device  # noqa: E402
from sparse_predictor.trainer.labels import BLOCKS, LabelSpec, fraction_list, k_name, make_label_spec  # noqa: E402
from sparse_predictor.trainer.records import collection_source  # noqa: E402
from sparse_predictor.trainer.rows import MIN_TEST_DOCS, TEST_FRACTION, SplitConfig, document_split  # noqa: E402
from sparse_predictor.trainer.static import RANKING_RULE, STATIC_INPUT, static_counts, static_path  # noqa: E402


def block_label(store: ActivationStore, block: str, k: float, gqa_groups: bool) -> LabelSpec:
    width = store.dims.ffn_dim if block == "mlp" else store.dims.num_heads
    group = store.dims.num_heads // store.dims.num_kv_heads if gqa_groups else 1
    return make_label_spec(block, "topk", k, None, width, group)


def static_record(store: ActivationStore, block: str, layer: int, label: LabelSpec, split: SplitConfig,
                  is_test: np.ndarray, counts: list[int], provenance: dict) -> dict:
    """The file the runner's mode `static` reads (SPEC §7): counts per unit and everything they depend on."""
    docs = store.document_ids()
    source = collection_source(store)
    return {"block": block, "layer": layer, "label": label.name, "k": label.k, "K": label.top_count(len(counts)),
            "width": len(counts), "label_group": label.group, "counts": counts, "ranking": RANKING_RULE, "label_definition": label.definition(),
            "count_rule": COUNT_RULE, "input": STATIC_INPUT,
            "rows_train": int((~is_test).sum()), "documents_train": len(np.unique(docs[~is_test])),
            "split": split.describe(), "test_documents": [int(d) for d in np.unique(docs[is_test])],
            "data": {"collection": source.mode, "data_dir": source.data_dir, "rows": source.rows,
                     "dims": store.dims.__dict__, **source.fields},
            "provenance": {**provenance, "end_time": now()}}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True, help="a complete collection (SPEC §6)")
    p.add_argument("--out-dir", required=True,
                   help="where static_{block}_layer{L}.json go; with several --k a template holding {k} (e.g. "
                        "predictors/b{k}), as the mains' --out-dir")
    p.add_argument("--block", choices=BLOCKS, required=True, help="mlp (neurons) or att (heads)")
    p.add_argument("--k", type=fraction_list, required=True,
                   help=f"fraction of the units in each row's true top-K ({COUNT_RULE}); the budget the runner keeps. "
                        f"A comma list counts every fraction in one read, each written to its own --out-dir ({{k}})")
    p.add_argument("--gqa-groups", action="store_true",
                   help="attention in whole key/value groups, as the runner's --gqa-groups keeps them (the label of "
                        "main_att*.py --gqa-groups)")
    p.add_argument("--L", default="all", help="layer index, a list such as 0-13 or 0,4,8, or 'all' (default "
                                              "%(default)s)")
    p.add_argument("--test-fraction", type=float, default=TEST_FRACTION,
                   help="held-out share of the rows, never counted: the predictors' split (whole documents from the "
                        f"end, at least min({MIN_TEST_DOCS}, half the documents); default %(default)s)")
    p.add_argument("--test-docs", type=int, default=None,
                   help="hold out exactly this many documents (the last collected) instead of --test-fraction")
    p.add_argument("--device", default=None, help="torch device; default cuda:0 if CUDA is available, else cpu")
    return p


def main(argv: list[str] | None = None) -> list[Path]:
    args = build_parser().parse_args(argv)
    provenance = base_manifest(kind="static_topk", args=vars(args))
    store, layers = open_layers(args.data_dir, args.L)
    if args.gqa_groups and args.block != "att":
        raise ValueError("--gqa-groups counts whole key/value groups of attention heads: use it with --block att")
    labels = [block_label(store, args.block, k, args.gqa_groups) for k in args.k]
    out_dirs = label_out_dirs(args.out_dir, labels)
    split = SplitConfig(args.test_fraction, args.test_docs)
    is_test = document_split(store.document_ids(), split.test_fraction, split.test_docs)
    device = resolve_device(args.device)
    written = []
    for layer in tqdm(layers, desc=f"{args.block} static top-K", unit="layer"):
        for label, out_dir, counts in zip(labels, out_dirs,
                                          static_counts(store, args.block, layer, labels, ~is_test, device)):
            record = static_record(store, args.block, layer, label, split, is_test, counts.tolist(), provenance)
            path = static_path(out_dir, args.block, layer)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(path, record)
            written.append(path)
    print(f"wrote {len(written)} static top-K file(s) to {', '.join(map(str, out_dirs))} ({args.block}, k "
          f"{','.join(k_name(k) for k in args.k)}, {record['rows_train']} training rows)")
    return written


if __name__ == "__main__":
    main()

"""Train (or only build) structured MLP predictors: the MLP's own form at low rank, from the SVD of its weights.

Llama: score_i = |act(g_i) * u_i| with g, u rank-r maps of z; OPT: ReLU(h_i), h a rank-r fc1 with its bias; z = the
input (att_x_l for --input lookahead, DejaVu's wiring; mlp_x_l for same) through the layer's MLP norm. --variant svd
writes the truncated SVD of the layer's own projections as it is (no training); --variant trained starts there and
trains on the top-K label with the project's trainer (class-weighted BCE, AdamW, the mains' batches, seed, document
split, selection and held-out metrics). Model and files: sparse_predictor/structured.py; the sparse runner's mode
`structured` loads <out-dir>/structured_mlp_layer{L}.pt and its JSON (SPEC §7-8).

    python sparse_predictor/train_structured.py --data-dir data/llama-3.2-3b_c4 --model-dir pretrained_models/llama-3.2-3b \\
        --L all --k 0.25,0.5 --rank 64,equal,full --variant trained --out-dir data/structured/r{rank}/b{k}
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # lets `python sparse_predictor/<this file>` run

import torch  # noqa: E402

from Decentralized_FM_alpha.utils.manifest import base_manifest  # noqa: E402
from sparse_predictor import main_mlp_llama, structured  # noqa: E402
from sparse_predictor.trainer.cli import (add_save_dtype_argument, add_training_arguments, checkpoint_state,  # noqa: E402
                                          label_out_dirs, open_layers, resolve_device, split_config, train_config)
from sparse_predictor.trainer.labels import fraction_list, make_label_spec  # noqa: E402
from sparse_predictor.trainer.model import format_metrics  # noqa: E402
from sparse_predictor.trainer.records import collection_source, layer_record, write_outputs  # noqa: E402
from sparse_predictor.trainer.rows import load_layer  # noqa: E402

DEFAULT_K = main_mlp_llama.DEFAULTS["k"]  # the Llama MLP main's top-K fraction


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="model", help="names the run in the JSONs (default %(default)s)")
    p.add_argument("--dataset", default="c4", help="names the collection (default %(default)s)")
    p.add_argument("--data-dir", required=True, help="collected activations (SPEC §6)")
    p.add_argument("--model-dir", required=True,
                   help="the converted checkpoint the collection was made with (SPEC §3): each layer's MLP norm and "
                        "projections are read from its pytorch_{L}.pt")
    p.add_argument("--out-dir", required=True,
                   help="where structured_mlp_layer{L}.pt/.json go; with several --k a template holding {k}, with "
                        "several --rank one holding {rank} (the rank as written, e.g. r{rank}/b{k})")
    p.add_argument("--L", default="0", help="a layer, a list such as 0-13, or 'all' (default %(default)s)")
    p.add_argument("--k", type=fraction_list, default=[DEFAULT_K],
                   help="top-K label fraction(s), comma list trained together (default %(default)s)")
    p.add_argument("--rank", type=structured.rank_list, default=["equal"],
                   help="rank(s) of the factors, comma list: integers, 'full' = min(d, ffn), 'equal' = as many factor "
                        "weights as DejaVu's predictor at --D (D/2 for Llama's two factor pairs, D for OPT's one); "
                        "default %(default)s")
    p.add_argument("--variant", choices=tuple(structured.VARIANTS), default="trained",
                   help="svd: the truncated SVD of the layer's projections, not trained; trained: that start trained "
                        "on the top-K label (default %(default)s)")
    p.add_argument("--input", choices=structured.INPUTS, default="lookahead",
                   help="lookahead: att_x_l (DejaVu's inference wiring, default); same: mlp_x_l (the MLP's input)")
    add_training_arguments(p, lr=structured.DEFAULT_LR)
    add_save_dtype_argument(p)
    return p


def out_dirs(template: str, rank_spec: str, several_ranks: bool, labels) -> list[Path]:
    """The folders of one rank's labels: {rank} filled (needed with several ranks), then {k} as the mains fill it."""
    if several_ranks and "{rank}" not in template:
        raise ValueError(f"several --rank values need {{rank}} in --out-dir (e.g. {template}/r{{rank}}), got "
                         f"{template!r}")
    return label_out_dirs(template.replace("{rank}", rank_spec), labels)


def main(argv: list[str] | None = None) -> list[Path]:
    """Build or train every requested (layer, rank, k); returns the JSON paths written."""
    args = build_parser().parse_args(argv)
    if args.seeds != 1:
        raise ValueError("--seeds: one structured predictor per label (its SVD start is deterministic; --seed orders "
                         "the batches)")
    device = resolve_device(args.device)
    store, layers = open_layers(args.data_dir, args.L)
    ffn, d = store.dims.ffn_dim, store.dims.hidden_size
    labels = [make_label_spec("mlp", "topk", k, None, ffn) for k in args.k]
    variant = structured.VARIANTS[args.variant]
    cfg = train_config(args)
    recorded = cfg if variant == structured.VARIANTS["trained"] else replace(cfg, epochs=0)  # svd: never trained
    max_bytes = None if args.max_device_gb is None else int(args.max_device_gb * 2**30)
    ranks = dict.fromkeys(args.rank)  # each rank once, in the order given
    folders = {spec: out_dirs(args.out_dir, spec, len(ranks) > 1, labels) for spec in ranks}
    source = collection_source(store)
    written = []
    for layer in layers:
        provenance = base_manifest(args=vars(args))
        weights = structured.read_mlp_weights(args.model_dir, layer, store.dims)
        factors = structured.svd_factors(weights)  # one SVD per projection, every rank
        start = time.perf_counter()
        data = load_layer(store, "mlp", layer, args.input, labels, device, cfg.batch_size, max_bytes,
                          split_config(args))
        load_s = time.perf_counter() - start
        for spec, dirs in folders.items():
            rank = structured.resolve_rank(spec, weights.form, d, ffn, args.D)
            started = time.perf_counter()
            results = structured.train_structured(data, weights, rank, variant, cfg, log=lambda _: None,
                                                  factors=factors)
            timings = {"load_s": load_s, "train_and_eval_s": time.perf_counter() - started}
            for result in results:
                record = layer_record(args, "mlp", layer, source, data, recorded, result, timings, provenance)
                record.update(structured.structured_fields(weights, layer, spec, rank, variant, d, ffn, args.D,
                                                           args.model_dir))
                record["checkpoint_dtype"] = args.save_dtype
                checkpoint, json_path = write_outputs(dirs[result.label_index], structured.FILE_BLOCK, layer,
                                                      checkpoint_state(result.state_dict, args.save_dtype), record)
                written.append(json_path)
                print(f"wrote {checkpoint} ({variant}, rank {rank}): "
                      f"{format_metrics({k: v for k, v in result.metrics.items() if k != 'per_document'})}")
        del data
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return written


if __name__ == "__main__":
    main()

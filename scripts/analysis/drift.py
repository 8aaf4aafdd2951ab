"""Drift of the residual stream between layers: does an earlier layer's input look like a later one's?

DejaVu's premise (asynchronous lookahead) is that the residual stream changes slowly from layer to layer. For
each layer l, distance k = 1..K and kind (att_x: the block input; mlp_x: the stream after the attention add),
this script measures the cosine similarity between the same token's x_l and x_{l+k} over a sample of collected
tokens (SPEC §6), and reports the mean and the 5/25/50/75/95th percentiles, in two spaces:
  raw     the stored residual stream;
  normed  both vectors passed through the norm of the target layer l+k (its input norm for att_x, its MLP norm
          for mlp_x), i.e. what layer l+k's block would see if it were fed x_l instead of x_{l+k}. OPT: LayerNorm
          (mean-centred, unit variance, then weight and bias); Llama: RMS normalisation (then weight). Without
          --model-dir the norms are parameter-free (no weight, no bias), and the output says so; for Llama that
          makes normed equal to raw up to eps, since cosine ignores a per-vector scale.
  raw centred, normed centred   the same two spaces after subtracting each layer's mean vector (the mean of x_l,
          or of x_l through layer l+k's norm, over the sampled rows of the training documents of the predictors'
          default split): what is left once the direction shared by every token is removed.
Residual streams are anisotropic, so a cosine of 0 is no floor: beside every same-token cosine the script gives the
cross-token one, cosine(x_l of token i, x_{l+k} of token j) with j a random sampled token of ANOTHER document
(seeded), and how far the same-token mean exceeds it.
--exclude-massive-dims N also reports every space without the N hidden dimensions of largest mean |activation|
(normalisation first, over all dims, as the model does; the dims are dropped before the cosine), so a reader
can see whether a handful of dimensions drive the similarity.

    python scripts/analysis/drift.py --data-dir data/llama-3.2-3b_c4 --out-dir out/drift/llama-3.2-3b \\
        --model-dir pretrained_models/llama-3.2-3b --max-distance 8 --exclude-first-token --exclude-massive-dims 4
Writes <out-dir>/drift.json (settings, chosen massive dims, per-layer records, provenance) and drift.csv.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # lets `python scripts/analysis/drift.py` run

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from Decentralized_FM_alpha.modules.checkpoint import read_state_dict  # noqa: E402
from Decentralized_FM_alpha.utils.activation_store import ActivationStore  # noqa: E402
from Decentralized_FM_alpha.utils.intervals import bootstrap, ratio  # noqa: E402
from Decentralized_FM_alpha.utils.manifest import base_manifest  # noqa: E402
from sparse_predictor.trainer.rows import SplitConfig, document_split  # noqa: E402
from sparse_predictor.trainer.cli import resolve_device  # noqa: E402
from scripts.analysis.common import (PERCENTILES, RowSample, collection_source,  # noqa: E402
                                     iter_row_chunks, model_family, open_collection, read_rows, rows_per_chunk,
                                     rowwise_cosine, sample_rows, summarize_values, write_results)

KINDS = ("att_x", "mlp_x")
CPU = torch.device("cpu")
DEFAULT_EPS = 1e-5  # nn.LayerNorm's default (OPT) and Llama 3.x's rms_norm_eps
# The norm each kind goes through in a layer, as keys of the converted pytorch_{l}.pt (SPEC §3): (weight, bias).
NORM_KEYS = {("opt", "att_x"): ("self_attn_layer_norm.weight", "self_attn_layer_norm.bias"),
             ("opt", "mlp_x"): ("final_layer_norm.weight", "final_layer_norm.bias"),
             ("llama", "att_x"): ("input_layernorm.weight", None),
             ("llama", "mlp_x"): ("post_attention_layernorm.weight", None)}
CSV_COLUMNS = ("model", "kind", "layer", "k", "target_layer", "space", "dims", "mean",
               *(f"p{p}" for p in PERCENTILES), "n", "cross_token_mean", "same_minus_cross")


# ------------------------------------------------------------------------------------- the model's norms
@dataclass
class Norms:
    """The norm a kind goes through at each layer; weights empty for the parameter-free version."""
    family: str
    eps: float
    description: str
    weights: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)

    def apply(self, kind: str, layer: int, x: torch.Tensor) -> torch.Tensor:
        """(n, d) float32 rows through layer `layer`'s norm for `kind`."""
        if self.family == "opt":
            x = x - x.mean(dim=1, keepdim=True)
        x = x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + self.eps)
        if (kind, layer) in self.weights:
            weight, bias = self.weights[(kind, layer)]
            x = x * weight
            if bias is not None:
                x = x + bias
        return x

    def to(self, device: torch.device) -> Norms:
        """The same norms with their weights on `device`."""
        weights = {key: tuple(None if t is None else t.to(device) for t in pair) for key, pair in self.weights.items()}
        return Norms(self.family, self.eps, self.description, weights)


def parameter_free_norms(family: str) -> Norms:
    what = ("LayerNorm without affine (mean-centred, unit variance)" if family == "opt"
            else "RMS normalisation without weight")
    return Norms(family, DEFAULT_EPS, f"{what}, eps {DEFAULT_EPS}; parameter-free because no --model-dir was given")


def load_model_norms(family: str, model_dir: Path, kinds: tuple[str, ...], num_layers: int, hidden: int) -> Norms:
    """The model's norm weights (and OPT biases) from a converted checkpoint directory (SPEC §3)."""
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"missing checkpoint config: {config_path}")
    config = json.loads(config_path.read_text())
    eps = float(config["rms_norm_eps"]) if family == "llama" else float(config.get("layer_norm_eps", DEFAULT_EPS))
    weights = {}
    for layer in range(num_layers):
        path = model_dir / f"pytorch_{layer}.pt"
        state = read_state_dict(model_dir, path.name)  # error naming the file when it is missing
        for kind in kinds:
            weight_key, bias_key = NORM_KEYS[(family, kind)]
            weights[(kind, layer)] = tuple(norm_parameter(state, key, path, hidden) if key else None
                                           for key in (weight_key, bias_key))
    what = "LayerNorm with the model's weight and bias" if family == "opt" else "RMSNorm with the model's weight"
    keys = ", ".join(f"{k}: {NORM_KEYS[(family, k)][0]}" for k in kinds)
    return Norms(family, eps, f"{what} ({keys}) from {model_dir.resolve()}/pytorch_{{l}}.pt, eps {eps}", weights)


def norm_parameter(state: dict, key: str, path: Path, hidden: int) -> torch.Tensor:
    if key not in state:
        raise KeyError(f"{path}: missing key {key!r} (needed for the normed drift)")
    value = state[key].float()
    if tuple(value.shape) != (hidden,):
        raise ValueError(f"{path}: {key!r} has shape {tuple(value.shape)}, the collection's hidden size is {hidden}")
    return value


# ------------------------------------------------------------------------------------- massive dimensions
@dataclass
class MassiveDims:
    """The hidden dimensions left out of the 'without_massive' cosines, chosen once per model or per layer."""
    count: int
    per_layer: bool
    chosen: dict[str, list[int]]  # "model" -> dims, or "{kind}_{layer}" -> dims
    mean_abs: dict[str, list[float]]  # mean |activation| of the chosen dims, same keys and order
    median_mean_abs: dict[str, float]  # median over all dims of mean |activation|, for scale

    def excluded(self, kind: str, source: int, target: int) -> list[int]:
        """Dims dropped for the pair (x_source, x_target): the model's, or the union of both layers' own."""
        if not self.per_layer:
            return self.chosen["model"]
        return sorted(set(self.chosen[f"{kind}_{source}"]) | set(self.chosen[f"{kind}_{target}"]))

    def describe(self) -> dict:
        rule = ("per layer: for the pair (l, l+k) the union of the dims chosen at l and at l+k" if self.per_layer
                else "once per model: largest mean over the analysed kinds and layers of mean |activation|")
        return {"count": self.count, "rule": rule, "chosen": self.chosen, "mean_abs_of_chosen": self.mean_abs,
                "median_mean_abs_all_dims": self.median_mean_abs}


def mean_abs_per_dim(store: ActivationStore, kinds: tuple[str, ...], sample: RowSample,
                     device: torch.device = CPU) -> dict[str, np.ndarray]:
    """'{kind}_{layer}' -> (d,) mean |activation| over the sampled rows, streamed chunk by chunk."""
    sums = {f"{k}_{l}": np.zeros(store.dims.hidden_size) for k in kinds for l in range(store.num_layers)}
    chunk = rows_per_chunk(store.dims.hidden_size)
    for _, rows in tqdm(list(iter_row_chunks(sample.rows, chunk)), desc="mean |x| per dim", unit="chunk"):
        for kind in kinds:
            for layer in range(store.num_layers):
                x = read_rows(store.open(kind, layer), rows).to(device)
                sums[f"{kind}_{layer}"] += x.abs().sum(dim=0).double().cpu().numpy()
    return {key: s / len(sample.rows) for key, s in sums.items()}


def choose_massive_dims(mean_abs: dict[str, np.ndarray], count: int, per_layer: bool) -> MassiveDims:
    """The `count` dims of largest mean |activation|, per '{kind}_{layer}' or from their mean over all of them."""
    def top(values: np.ndarray) -> list[int]:
        return sorted(int(i) for i in np.argsort(-values, kind="stable")[:count])

    pooled = dict(mean_abs) if per_layer else {"model": np.mean(list(mean_abs.values()), axis=0)}
    chosen = {key: top(v) for key, v in pooled.items()}
    mean_abs_of_chosen = {key: [float(pooled[key][i]) for i in dims] for key, dims in chosen.items()}
    medians = {key: float(np.median(v)) for key, v in pooled.items()}
    return MassiveDims(count, per_layer, chosen, mean_abs_of_chosen, medians)


# ------------------------------------------------------------------------------------- baselines of the cosine
@dataclass
class Means:
    """Each layer's mean vector, subtracted for the centred spaces: raw[(kind, layer)] of x_layer, and
    normed[(kind, source, target)] of x_source through layer target's norm (the normed space of a pair)."""
    raw: dict[tuple[str, int], torch.Tensor]
    normed: dict[tuple[str, int, int], torch.Tensor]
    rows: int
    rule: str


def layer_pairs(num_layers: int, max_distance: int) -> list[tuple[int, int]]:
    return [(l, k) for l in range(num_layers) for k in range(1, max_distance + 1) if l + k < num_layers]


def mean_vectors(store: ActivationStore, kinds: tuple[str, ...], pairs: list[tuple[int, int]], rows: np.ndarray,
                 norms: Norms, rule: str, device: torch.device = CPU) -> Means:
    """The mean of every layer's vectors over `rows` (the sampled rows of the training documents), raw and through
    each target layer's norm, streamed chunk by chunk."""
    L, d = store.num_layers, store.dims.hidden_size
    targets = sorted({(s, t) for l, k in pairs for s, t in ((l, l + k), (l + k, l + k))})
    raw = {(kind, l): torch.zeros(d, dtype=torch.float64, device=device) for kind in kinds for l in range(L)}
    normed = {(kind, s, t): torch.zeros(d, dtype=torch.float64, device=device) for kind in kinds for s, t in targets}
    for _, chunk in tqdm(list(iter_row_chunks(rows, rows_per_chunk(L * d * 2))), desc="layer means", unit="chunk"):
        for kind in kinds:
            x = [read_rows(store.open(kind, layer), chunk).to(device) for layer in range(L)]
            for layer in range(L):
                raw[(kind, layer)] += x[layer].sum(dim=0, dtype=torch.float64)
            for s, t in targets:
                normed[(kind, s, t)] += norms.apply(kind, t, x[s]).sum(dim=0, dtype=torch.float64)
    return Means({k: (v / len(rows)).float() for k, v in raw.items()},
                 {k: (v / len(rows)).float() for k, v in normed.items()}, len(rows), rule)


def cross_token_partners(documents: np.ndarray, seed: int, attempts: int = 100) -> np.ndarray:
    """(n,) for each sampled row i, the position j of a sampled row of ANOTHER document (a seeded random pairing):
    cosine(x_l of token i, x_{l+k} of token j) is what two unrelated tokens share, the floor of the same-token one."""
    if len(np.unique(documents)) < 2:
        raise ValueError("cross-token pairs need rows of at least 2 documents in the sample")
    rng = np.random.default_rng(seed)
    partner = rng.permutation(len(documents))
    for _ in range(attempts):
        clash = np.flatnonzero(documents[partner] == documents)
        if len(clash) == 0:
            return partner
        partner[clash] = rng.integers(0, len(documents), size=len(clash))
    raise ValueError(f"no partner from another document for {len(clash)} rows after {attempts} draws")


# ------------------------------------------------------------------------------------- cosines
PAIRINGS = ("same_token", "cross_token")


def space_vectors(x_source: torch.Tensor, x_target: torch.Tensor, kind: str, source: int, target: int, norms: Norms,
                  means: Means | None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """space -> the pair's two (n, d) row sets: raw, normed (through layer target's norm) and, with `means`, both
    minus their layer's mean vector (raw centred, normed centred)."""
    normed = (norms.apply(kind, target, x_source), norms.apply(kind, target, x_target))
    spaces = {"raw": (x_source, x_target), "normed": normed}
    if means is not None:
        spaces["raw centred"] = (x_source - means.raw[(kind, source)], x_target - means.raw[(kind, target)])
        spaces["normed centred"] = (normed[0] - means.normed[(kind, source, target)],
                                    normed[1] - means.normed[(kind, target, target)])
    return spaces


def pair_cosines(x_source: torch.Tensor, x_target: torch.Tensor, kind: str, source: int, target: int, norms: Norms,
                 massive: MassiveDims | None, means: Means | None = None) -> dict[tuple[str, str], torch.Tensor]:
    """(space, dims) -> (n,) cosines of one chunk for the pair (x_source, x_target), row i with row i."""
    out = {}
    for space, (a, b) in space_vectors(x_source, x_target, kind, source, target, norms, means).items():
        out[(space, "all")] = rowwise_cosine(a, b)
        if massive is not None:
            keep = np.setdiff1d(np.arange(a.shape[1]), massive.excluded(kind, source, target))
            keep_t = torch.from_numpy(keep).to(a.device)
            out[(space, "without_massive")] = rowwise_cosine(a[:, keep_t], b[:, keep_t])
    return out


def drift_cosines(store: ActivationStore, kinds: tuple[str, ...], max_distance: int, sample: RowSample, norms: Norms,
                  massive: MassiveDims | None, means: Means | None = None, partners: np.ndarray | None = None,
                  device: torch.device = CPU) -> dict[tuple[str, str, int, int, str, str], np.ndarray]:
    """(pairing, kind, layer, k, space, dims) -> (rows,) cosines over the sample; every layer file is read once per
    chunk. same_token: x_l and x_{l+k} of one token; cross_token (with `partners`): x_l of token i and x_{l+k} of
    its partner token (another document)."""
    L = store.num_layers
    pairs = layer_pairs(L, max_distance)
    if not pairs:
        raise ValueError(f"{store.data_dir}: {L} layer(s) leave no pair at distance 1..{max_distance}")
    spaces = ("raw", "normed") + (("raw centred", "normed centred") if means is not None else ())
    variants = [(s, d) for s in spaces for d in (("all", "without_massive") if massive else ("all",))]
    pairings = PAIRINGS if partners is not None else PAIRINGS[:1]
    cosines = {(pairing, kind, l, k, s, d): np.empty(len(sample.rows), dtype=np.float32)
               for pairing in pairings for kind in kinds for l, k in pairs for s, d in variants}
    chunk = rows_per_chunk(L * store.dims.hidden_size * 4)  # one kind's layers and partners, room for normed copies
    for part, rows in tqdm(list(iter_row_chunks(sample.rows, chunk)), desc="drift cosines", unit="chunk"):
        for kind in kinds:
            x = [read_rows(store.open(kind, layer), rows).to(device) for layer in range(L)]
            others = {"same_token": x}
            if partners is not None:
                other_rows = sample.rows[partners[part]]
                order = np.argsort(other_rows)  # read in file order, then put back in partner order
                back = np.argsort(order)
                others["cross_token"] = [read_rows(store.open(kind, layer), other_rows[order])[back].to(device)
                                         for layer in range(L)]
            for pairing, y in others.items():
                for l, k in pairs:
                    for (space, dims), values in pair_cosines(x[l], y[l + k], kind, l, l + k, norms, massive,
                                                              means).items():
                        cosines[(pairing, kind, l, k, space, dims)][part] = values.cpu().numpy()
    return cosines


def drift_records(model: str, cosines: dict[tuple[str, str, int, int, str, str], np.ndarray]) -> list[dict]:
    """One record per (kind, layer, k, space, dims): the same-token cosine's mean and percentiles, and beside it the
    cross-token mean and how far the same-token mean exceeds it (when cross-token pairs were drawn)."""
    records = []
    for (pairing, kind, l, k, space, dims), values in cosines.items():
        if pairing != "same_token":
            continue
        record = {"model": model, "kind": kind, "layer": l, "k": k, "target_layer": l + k, "space": space,
                  "dims": dims, **summarize_values(values)}
        cross = cosines.get(("cross_token", kind, l, k, space, dims))
        if cross is not None:
            record["cross_token"] = summarize_values(cross)
            record["cross_token_mean"] = record["cross_token"]["mean"]
            record["same_minus_cross"] = record["mean"] - record["cross_token_mean"]
        records.append(record)
    return records


def k1_intervals(cosines: dict[tuple[str, str, int, int, str, str], np.ndarray], documents: np.ndarray) -> list[dict]:
    """Per (kind, space, dims): the mean over layers l >= 1 and sampled tokens of cosine(x_l, x_{l+1}), with a
    bootstrap interval over documents (the tokens of one document are not independent draws); beside it the
    cross-token cosine and the same-token minus cross-token difference, paired by token (both resample token i's
    document). Layer 0's pair (the embedding against the first block's output) is left out of the pool: it is no
    step of the residual stream's drift between blocks, and drift.csv keeps it per layer."""
    ids, inverse = np.unique(documents, return_inverse=True)
    groups: dict[tuple[str, str, str], dict[str, dict[int, np.ndarray]]] = {}
    for (pairing, kind, layer, k, space, dims), values in cosines.items():
        if k == 1 and layer >= 1:
            groups.setdefault((kind, space, dims), {}).setdefault(pairing, {})[layer] = values
    out = []
    for (kind, space, dims), by_pairing in sorted(groups.items()):
        per_layer = by_pairing["same_token"]
        counts = np.bincount(inverse, minlength=len(ids)) * len(per_layer)

        def interval(values: np.ndarray) -> dict:
            sums = np.bincount(inverse, weights=values, minlength=len(ids))
            return bootstrap({"sum": sums, "count": counts}, ratio("sum", "count")).as_dict()

        same = np.sum(list(per_layer.values()), axis=0)
        record = {"kind": kind, "k": 1, "space": space, "dims": dims, "layers": len(per_layer),
                  "pooled_layers": sorted(per_layer), **interval(same)}
        if "cross_token" in by_pairing:
            cross = np.sum([by_pairing["cross_token"][layer] for layer in per_layer], axis=0)
            record["cross_token"] = interval(cross)
            record["same_minus_cross"] = interval(same - cross)
        out.append(record)
    return out


def mean_over_layers(records: list[dict]) -> list[dict]:
    """Per (kind, k, space, dims): the mean over layers of the per-layer mean cosine (what the report quotes), and
    of the cross-token mean where drawn."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["kind"], r["k"], r["space"], r["dims"]), []).append(r)
    out = []
    for (kind, k, space, dims), rs in sorted(groups.items()):
        row = {"kind": kind, "k": k, "space": space, "dims": dims,
               "mean_of_layer_means": float(np.mean([r["mean"] for r in rs])), "layers": len(rs)}
        if all("cross_token_mean" in r for r in rs):
            row["cross_token_mean_of_layer_means"] = float(np.mean([r["cross_token_mean"] for r in rs]))
        out.append(row)
    return out


# ------------------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True, help="a complete collection (SPEC §6): att_x_{l}.mmap, mlp_x_{l}.mmap")
    p.add_argument("--out-dir", required=True, help="where drift.json and drift.csv are written")
    p.add_argument("--max-distance", "-K", type=int, default=8,
                   help="largest layer distance k; pairs (l, l+k) for k = 1..K within the model (default %(default)s)")
    p.add_argument("--kinds", default="att_x,mlp_x",
                   help="comma list of att_x and/or mlp_x (default %(default)s)")
    p.add_argument("--model-dir", type=Path, default=None,
                   help="converted checkpoint (SPEC §3) whose norm weights (OPT: self_attn_layer_norm / "
                        "final_layer_norm weight and bias; Llama: input_layernorm / post_attention_layernorm weight) "
                        "and eps are used for the normed space; without it the norms are parameter-free")
    p.add_argument("--first-rows", type=int, default=None,
                   help="read only the collection's first N rows (the documents in collection order, the last one "
                        "maybe cut), the sample, the split and the means all taken within them: the study's drift "
                        "rows, the same whether read from a full collection or from one of N rows (default: all)")
    p.add_argument("--max-rows", type=int, default=50_000,
                   help="analyse at most this many rows, drawn without replacement with --seed (default "
                        "%(default)s; a number >= the collection's rows uses them all)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the row sample and of the cross-token pairing (default %(default)s)")
    p.add_argument("--exclude-first-token", action="store_true",
                   help="drop position 0 of every document (token_index.npy) before sampling: the BOS token, or the "
                        "first text token when the tokenizer adds no BOS (the output records which)")
    p.add_argument("--exclude-massive-dims", type=int, default=0, metavar="N",
                   help="also report cosines without the N hidden dims of largest mean |activation| over the "
                        "sampled rows (default 0: not computed)")
    p.add_argument("--device", default="cpu",
                   help="where the cosines and means are computed, e.g. cuda:0 (default %(default)s); rows are read "
                        "on the host either way, and the numbers agree to float rounding")
    p.add_argument("--massive-per-layer", action="store_true",
                   help="choose the massive dims per kind and layer (a pair drops the union of both layers' dims) "
                        "instead of once per model")
    return p


def main(argv: list[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    kinds = tuple(k.strip() for k in args.kinds.split(","))
    if not set(kinds) <= set(KINDS):
        raise SystemExit(f"--kinds {args.kinds}: only {KINDS} are residual streams")
    if args.max_distance < 1 or args.max_rows < 1 or (args.first_rows or 1) < 1 or args.exclude_massive_dims < 0:
        raise SystemExit("--max-distance, --max-rows and --first-rows must be >= 1, --exclude-massive-dims >= 0")
    provenance = base_manifest(kind="drift")
    store = open_collection(args.data_dir)
    if args.first_rows is not None:
        store = store.prefix(args.first_rows)
    family = model_family(store.manifest)
    if args.exclude_massive_dims >= store.dims.hidden_size:
        raise SystemExit(f"--exclude-massive-dims {args.exclude_massive_dims} leaves none of the "
                         f"{store.dims.hidden_size} dims")
    norms = (load_model_norms(family, args.model_dir, kinds, store.num_layers, store.dims.hidden_size)
             if args.model_dir else parameter_free_norms(family))
    print(f"normed space: {norms.description}")
    device = resolve_device(args.device)
    norms = norms.to(device)
    sample = sample_rows(store, args.max_rows, args.seed, args.exclude_first_token)
    massive = None
    if args.exclude_massive_dims:
        massive = choose_massive_dims(mean_abs_per_dim(store, kinds, sample, device), args.exclude_massive_dims,
                                      args.massive_per_layer)
        print(f"massive dims left out: {massive.chosen if args.massive_per_layer else massive.chosen['model']}")
    source = collection_source(store)
    documents = np.asarray(store.token_index()[:, 0])
    is_test = document_split(documents)
    mean_rows = sample.rows[~is_test[sample.rows]]
    if len(mean_rows) == 0:
        raise SystemExit(f"{args.data_dir}: no sampled row of a training document to take the layer means from")
    rule = f"mean over the {len(mean_rows)} sampled rows of the training documents ({SplitConfig().describe()})"
    means = mean_vectors(store, kinds, layer_pairs(store.num_layers, args.max_distance), mean_rows, norms, rule, device)
    partners = cross_token_partners(documents[sample.rows], args.seed)
    cosines = drift_cosines(store, kinds, args.max_distance, sample, norms, massive, means, partners, device)
    records = drift_records(source["model"], cosines)
    payload = {"analysis": "drift", "source": source, "kinds": list(kinds), "max_distance": args.max_distance,
               "sample": sample.describe(), "first_rows": args.first_rows,
               "exclude_first_token": args.exclude_first_token, "device": str(device),
               "normalization": {"description": norms.description, "parameter_free": args.model_dir is None,
                                 "eps": norms.eps, "target_layer_norm": True},
               "massive_dims": massive.describe() if massive else None,
               "definition": "cosine(x_l, x_{l+k}) of the same token, raw and through layer l+k's norm, each also "
                             "centred (minus the layer's mean vector); cross_token: x_l of token i against x_{l+k} of "
                             "a random sampled token of another document",
               "centring": {"rows": means.rows, "rule": means.rule},
               "cross_token": {"seed": args.seed, "rule": "a seeded random permutation of the sample, a token of the "
                                                          "same document redrawn; one partner per sampled token"},
               "summary": mean_over_layers(records),
               "k1_intervals": k1_intervals(cosines, documents[sample.rows])}
    json_path, csv_path = write_results(args.out_dir, "drift", payload, records, CSV_COLUMNS, provenance)
    print(f"wrote {json_path} and {csv_path}: {len(records)} drift records ({len(sample.rows)} rows of "
          f"{source['model']}, k = 1..{args.max_distance})")
    return json_path


if __name__ == "__main__":
    main()

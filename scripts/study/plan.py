"""What a study will need before it starts (`run_study.py --plan`): disk, GPU memory, host RAM and time, per model.

Disk for the mmap path is exact for the activation files (the collection preallocates every file at its capacity:
rows x width x 2 bytes per kind and layer, plus the token index); the converted weights and predictor checkpoints are
counted by their tensors (files add a few KB each). The online path (run_study.py --collection online) collects one
group of layers at a time into --online-dir (layer_groups: the group's rows, with the earlier layers its inputs read,
within --memory-budget-gb), one forward pass per group; training from rows on the GPU (train_online.py) needs
train_online.group_bytes per layer. Times are estimates from rates measured in this repository
(docs/results/bench_collection_h200/, one H200 at Llama-3.2-3B shapes), each printed with its source; a stage without
a measured rate says so.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from Decentralized_FM_alpha.utils.activation_store import ModelDims
from Decentralized_FM_alpha.utils.row_files import DEFAULT_BUFFER_BYTES

REPO = Path(__file__).resolve().parents[2]
RATES = REPO / "docs/results/bench_collection_h200"
FLOAT16, FLOAT32 = 2, 4
TOKEN_INDEX_HEADER = 128  # the .npy header of token_index.npy (numpy's format pads it to 128 bytes here)


@dataclass(frozen=True)
class ModelFacts:
    name: str
    dims: ModelDims
    gated: bool  # a gate is collected (Llama family)
    parameters: int
    weight_bytes: int  # bytes per converted parameter
    vocab: int


def model_facts(name: str, config) -> ModelFacts:
    """Dims and sizes from a transformers config (OPT or the Llama family)."""
    llama = config.model_type != "opt"
    d, layers, heads = config.hidden_size, config.num_hidden_layers, config.num_attention_heads
    ffn = config.intermediate_size if llama else config.ffn_dim
    kv = getattr(config, "num_key_value_heads", heads) if llama else heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    attention = d * head_dim * (2 * heads + 2 * kv)
    mlp = (3 if llama else 2) * d * ffn
    embeddings = config.vocab_size * d * (1 if getattr(config, "tie_word_embeddings", True) else 2)
    dtype = str(getattr(config, "torch_dtype", None) or getattr(config, "dtype", None) or "float32")
    return ModelFacts(name, ModelDims(d, ffn, heads, kv, layers), llama, layers * (attention + mlp) + embeddings,
                      FLOAT32 if "32" in dtype else FLOAT16, config.vocab_size)


def layer_collection_bytes(dims: ModelDims, capacity: int, gated: bool) -> int:
    """The activation files of one layer (every kind, preallocated at capacity)."""
    widths = 2 * dims.hidden_size + dims.num_heads + dims.ffn_dim + (dims.ffn_dim if gated else 0)
    return capacity * FLOAT16 * widths


def collection_bytes(dims: ModelDims, capacity: int, gated: bool, layers: int | None = None) -> int:
    """Exactly what a collection of `layers` layers (default all) that fills `capacity` rows writes: the activation
    files and the token index twice (token_index.npy and the token_index.partial.npy it resumes from)."""
    layers = dims.num_layers if layers is None else layers
    return layer_collection_bytes(dims, capacity, gated) * layers + 2 * (capacity * 3 * 4 + TOKEN_INDEX_HEADER)


def layer_groups(num_layers: int, layer_bytes: int, budget_bytes: int, lookback: int) -> list[range]:
    """The online study's layer groups, one forward pass each: contiguous layers whose collected rows, with the
    `lookback` earlier layers their predictors' inputs read, fit `budget_bytes`; none when not one layer fits."""
    per_group = min(budget_bytes // layer_bytes - lookback, num_layers)
    if per_group < 1:
        return []
    return [range(start, min(start + per_group, num_layers)) for start in range(0, num_layers, per_group)]


def predictor_bytes(dims: ModelDims, D: int, mlp_budgets: int, att_budgets: int, group_budgets: int,
                    element_bytes: int = FLOAT32) -> int:
    """Tensors of the per-budget predictor checkpoints (Linear(d, D) -> Linear(D, out) per layer), element_bytes each
    (float32: 4, bfloat16: 2)."""
    mlp = element_bytes * (dims.hidden_size * D + D * dims.ffn_dim)
    att = element_bytes * (dims.hidden_size * D + D * dims.num_heads)
    return dims.num_layers * (mlp_budgets * mlp + (att_budgets + group_budgets) * att)


def online_group_bytes(dims: ModelDims, rows: int, mlp_fractions: list[float], att_fractions: list[float],
                       test_share: float = 0.05) -> int:
    """Device bytes of one layer's rows for online training with lookahead inputs (one att_x input shared by the
    layer's MLP predictors; the attention predictors read the previous layer's, counted with that layer): float16
    input, each label as bits, held-out rows also keep float16 scores (train_online.group_bytes' arithmetic)."""
    from sparse_predictor.trainer.rows import INPUT_ROW_BYTES_PER_DIM, label_row_bytes

    n_test = int(rows * test_share)
    n_train = rows - n_test
    per_label = lambda width: label_row_bytes(width, False) * n_train + label_row_bytes(width, True) * n_test  # noqa
    return (INPUT_ROW_BYTES_PER_DIM * dims.hidden_size * rows + len(mlp_fractions) * per_label(dims.ffn_dim)
            + len(att_fractions) * per_label(dims.num_heads))


def forward_flops_per_token(facts: ModelFacts, context: int) -> float:
    """Matmul FLOPs of one token's forward pass: 2 x weights, attention over half the context on average, LM head."""
    d, dims = facts.dims.hidden_size, facts.dims
    head_dim = d // dims.num_heads
    weights = facts.parameters - facts.vocab * d
    return 2 * weights + dims.num_layers * 4 * dims.num_heads * head_dim * context / 2 + 2 * d * facts.vocab


def measured_rates() -> dict:
    """Rates from the committed H200 bench JSONs, each with where it comes from; empty when they are absent."""
    run1, run3 = RATES / "run1_all_stages.json", RATES / "run3_disk24gb.json"
    if not (run1.is_file() and run3.is_file()):
        return {}
    one, three = json.loads(run1.read_text()), json.loads(run3.read_text())
    llama_3b = json.loads((REPO / "tests/fixtures/llama-3.2-3b-config.json").read_text())
    from transformers import LlamaConfig

    facts = model_facts("llama-3.2-3b", LlamaConfig(**llama_3b))
    online = one["online"]
    peak = one["matmul_peak"]["flops_per_s"] if isinstance(one["matmul_peak"], dict) else one["matmul_peak"]
    training_flops = (online["floor_s"] - online["forward_floor_s"]) * peak
    return {
        "collection_bytes_per_s": (three["collection_async"]["bytes_per_s"],
                                   f"{run3.relative_to(REPO)} collection_async (async writer, H200 disk)"),
        "inference_flops_per_s": (three["inference"]["tokens_per_s"] * forward_flops_per_token(facts, 512),
                                  f"{run3.relative_to(REPO)}: FLOP/s measured at Llama-3.2-3B shapes, inference "
                                  "tokens/s x its forward FLOPs/token; applied to this model's FLOPs"),
        "training_flops_per_s": (training_flops / online["groups"][0]["train_s"],
                                 f"{run1.relative_to(REPO)} online: training FLOPs / train_s (56 predictors, 400k rows)"),
    }


STAGE_FITS = REPO / "docs/results/study_3b_shapes/stage_fits.json"
FITTED_ROW_STAGES = ("collect", "predictors", "analysis", "summary")


def fitted_model(facts: ModelFacts, path: Path | None = None) -> tuple[str, list[dict]] | None:
    """The stage fits of scripts/bench/bench_study.py for a model of exactly this shape, with its name; None when the
    file is absent or no model in it has these dims (a fit is not stretched to another shape)."""
    path = path or STAGE_FITS
    if not path.is_file():
        return None
    found = json.loads(path.read_text())
    dims = {"hidden_size": facts.dims.hidden_size, "num_layers": facts.dims.num_layers, "ffn_dim": facts.dims.ffn_dim,
            "num_heads": facts.dims.num_heads, "num_kv_heads": facts.dims.num_kv_heads}
    for model, model_dims in found.get("dims", {}).items():
        if model_dims == dims:
            return model, [fit for fit in found["fits"] if fit["model"] == model]
    return None


def fitted_estimates(fits: list[dict], model: str, a, settings: dict[str, int], task_documents: int
                     ) -> list[tuple[str, str, str]]:
    """(stage, seconds, source) of every fitted stage: a + b x driver at this study's sizes; the sweep's and tasks'
    slope scaled by this study's settings over the measured run's (different modes, blocks or budgets)."""
    drivers = {**{stage: a.collect_tokens for stage in FITTED_ROW_STAGES}, "sweep": a.val_docs + (a.wiki_windows or 64),
               "tasks": task_documents}
    out = []
    for fit in fits:
        stage = fit["stage"]
        slope = fit["b_s_per_unit"] * drivers.get(stage, 0)
        if stage in settings and fit.get("settings"):
            slope *= settings[stage] / fit["settings"]
        out.append((stage, f"{fit['a_s'] + slope:,.0f}",
                    f"{STAGE_FITS.name} ({model}): a + b x driver fitted over {len(fit['points'])} measured sizes"))
    return out


def stage_estimates(facts: ModelFacts, a, rates: dict, tokens_scored: int, settings: int, predictor_flops: float
                    ) -> list[tuple[str, str, str]]:
    """(stage, seconds, source) for the stages a measured rate covers."""
    def est(seconds: float, key: str) -> tuple[str, str]:
        return f"{seconds:,.0f}", rates[key][1]

    if not rates:
        return [("all", "no estimate", f"no measured rates in {RATES.relative_to(REPO)}")]
    collect_bytes = collection_bytes(facts.dims, a.collect_tokens, facts.gated)
    collect_flops = a.collect_tokens * forward_flops_per_token(facts, a.max_seq_len)
    collect = max(collect_bytes / rates["collection_bytes_per_s"][0], collect_flops / rates["inference_flops_per_s"][0])
    sweep = settings * tokens_scored * forward_flops_per_token(facts, a.max_seq_len) / rates["inference_flops_per_s"][0]
    return [("collect", *est(collect, "collection_bytes_per_s")),
            ("predictors", *est(predictor_flops / rates["training_flops_per_s"][0], "training_flops_per_s")),
            ("sweep", *est(sweep, "inference_flops_per_s")),
            ("tasks, analysis, summary", "not estimated", "no measured rate at these shapes yet")]


def training_flops(facts: ModelFacts, a, fractions: int, group_fractions: int) -> float:
    """6 x (d D + D out) per row, epoch and predictor (forward and backward of the two matmuls)."""
    d, dims = facts.dims.hidden_size, facts.dims
    rows = a.collect_tokens * a.epochs * dims.num_layers
    mlp = 6 * (d * a.D + a.D * dims.ffn_dim)
    att = 6 * (d * a.D + a.D * dims.num_heads)
    return rows * (fractions * mlp + (fractions + group_fractions) * att)


@dataclass
class ModelPlan:
    facts: ModelFacts
    mmap_bytes: int
    online_bytes: int  # disk of the online path: weights, predictors, results
    groups: list[range]  # the online path's layer groups
    lines: list[str]


def plan_model(facts: ModelFacts, a, fractions: list[float], settings: int, rates: dict, lookback: int,
               task_settings: int = 0, task_documents: int = 0) -> ModelPlan:
    """`settings`: sweep runs (settings x 2 datasets); `task_settings` and `task_documents`: the tasks stage's settings
    and documents per setting."""
    dims = facts.dims
    groups = dims.num_kv_heads < dims.num_heads
    att_fractions = [float(f) for f in fractions]
    weights = facts.parameters * facts.weight_bytes
    predictors = predictor_bytes(dims, a.D, len(fractions), len(fractions), len(fractions) if groups else 0,
                                 FLOAT32 if a.predictor_dtype == "float32" else FLOAT16)
    activations = collection_bytes(dims, a.collect_tokens, facts.gated)
    layer = online_group_bytes(dims, a.collect_tokens, fractions, att_fractions + (att_fractions if groups else []))
    layer_rows = layer_collection_bytes(dims, a.collect_tokens, facts.gated)
    online_groups = layer_groups(dims.num_layers, layer_rows, int(a.memory_budget_gb * 2**30), lookback)
    largest = max((len(g) + min(g[0], lookback) for g in online_groups), default=0)
    tokens_scored = a.val_docs * a.max_seq_len + (a.wiki_windows or 64) * a.max_seq_len
    fitted = fitted_model(facts)
    if fitted:  # rates measured at this very shape, every stage
        estimates = fitted_estimates(fitted[1], fitted[0], a, {"sweep": settings // 2, "tasks": task_settings},
                                     task_documents)
    else:
        estimates = stage_estimates(facts, a, rates, tokens_scored, settings,
                                    training_flops(facts, a, len(fractions), len(fractions) if groups else 0))
    lines = [f"{facts.name}: {dims.num_layers} layers, d {dims.hidden_size}, ffn {dims.ffn_dim}, {dims.num_heads} heads "
             f"({dims.num_kv_heads} key/value), {facts.parameters:,} parameters",
             f"  disk, mmap path: activations {gib(activations)} (exact: {a.collect_tokens:,} rows x "
             f"{activations // a.collect_tokens:,} bytes), weights {gib(weights)}, predictors {gib(predictors)}",
             f"  disk, online path: weights {gib(weights)}, predictors {gib(predictors)} (no activation file)",
             f"  online path: {gib(layer_rows)} of collected rows per layer in --online-dir; a budget of "
             f"{a.memory_budget_gb:g} GiB holds "
             + (f"{len(online_groups[0])} layers per group (with the {lookback} earlier layers their inputs read, at "
                f"most {gib(collection_bytes(dims, a.collect_tokens, facts.gated, largest))}): {len(online_groups)} "
                f"groups, {len(online_groups)} forward passes (one more for the drift rows)" if online_groups else
                f"not one group of {lookback + 1} layers (a layer and the earlier ones its inputs read): raise it or "
                f"lower --collect-tokens"),
             f"  GPU, training from rows on the GPU (train_online.py's arithmetic): {gib(layer)} per layer",
             f"  host RAM: the async writer's staging {gib(DEFAULT_BUFFER_BYTES)}, plus one layer file at a time while "
             f"loading ({gib(weights // dims.num_layers)}); online with a RAM-backed --online-dir (/dev/shm), also "
             f"the largest group's rows ({gib(collection_bytes(dims, a.collect_tokens, facts.gated, largest))})",
             "  time, estimated:"] + [f"    {stage}: {seconds}{' s' if seconds[0].isdigit() else ''} ({source})" for stage, seconds, source in estimates]
    return ModelPlan(facts, activations + weights + predictors, weights + predictors, online_groups, lines)


def gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB"


def free_disk(path: Path) -> int:
    """Free bytes on the file system that will hold `path` (its nearest existing parent)."""
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def mmap_need_and_free(plans: list[ModelPlan], out_dir: Path) -> tuple[int, int]:
    """Bytes the mmap path of these plans needs, and the free bytes under out_dir."""
    return sum(p.mmap_bytes for p in plans), free_disk(out_dir)


def check_disk(plans: list[ModelPlan], out_dir: Path) -> None:
    """Refuse an mmap study that the free disk cannot hold, naming the need and the free space."""
    need, free = mmap_need_and_free(plans, out_dir)
    if need > free:
        raise SystemExit(f"the study's mmap path (activations, converted weights, predictors) needs {gib(need)} ({need:,} bytes: "
                         + ", ".join(f"{p.facts.name} {gib(p.mmap_bytes)}" for p in plans)
                         + f") but {out_dir} has {gib(free)} free ({free:,} bytes); lower --collect-tokens or free "
                           f"disk")

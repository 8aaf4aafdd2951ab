"""Train DejaVu's MLP and attention predictors online: the forward pass feeds the trainer, no activation file.

    python sparse_predictor/train_online.py --model-name pretrained_models/llama-3.2-3b \\
        --infer-data Decentralized_FM_alpha/c4_train/c4_train.jsonl --out-dir data/llama-3.2-3b_c4_sparse_predictor

The mmap path (runner --model-type *-save, SPEC §6, then the mains) writes every layer's rows to disk, 804 KB per
token at Llama-3.2-3B shapes (322 GB for DejaVu's 400,000 rows), and reads them back. This command runs the same
forward pass over the same documents (file order, the runner's batches, capacity --collect-tokens), keeps on the
device only the rows that a group of layers' predictors need (float16 inputs, labels as bits, held-out scores; a
shared input such as att_x_l, which is the MLP lookahead input of layer l and the attention one of layer l+1, once),
as many layers as fit in --memory-budget-gb; trains them with the mains' trainer (sparse_predictor/trainer/: same
document split, labels, metrics, checkpoints and JSONs), frees them, and runs the forward pass again (up to the
next group's last layer) for the next group. Host RAM holds the token ids and per-row split, not the rows.
Rows equal the collection's bit for bit (both store float16 of the same forward pass), so on the same documents,
flags and seed the predictors equal the mmap path's where the arithmetic is the same (tests/test_online_training.py).

Writes <out-dir>/{mlp,att}_layer{L}.pt/.json (JSON data.collection "online", input_file/label_file null: nothing
was stored), {mlp,att}_summary.csv/.md and online_manifest.json (documents, rows, split, groups, timings). A rerun
with the same settings skips the predictors already written.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

if __name__ == "__main__":  # lets `python sparse_predictor/train_online.py` find the repo's packages
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402
from transformers import AutoConfig  # noqa: E402

from Decentralized_FM_alpha.comm.comm_utils import SingleProcessComm  # noqa: E402
from Decentralized_FM_alpha.pipeline_parallel.dist_pipeline_inference_mask_sample import (  # noqa: E402
    DistInferenceMaskTokenPipeSync, Encoded, model_module)
from Decentralized_FM_alpha.task_datasets.inference_data import read_requests  # noqa: E402
from Decentralized_FM_alpha.utils.activation_store import DEFAULT_CAPACITY, ModelDims  # noqa: E402
from Decentralized_FM_alpha.utils.manifest import (base_manifest, file_sha256, now,  # noqa: E402
                                                   peak_rss_bytes, read_json, weights_provenance, write_json_atomic)
from Decentralized_FM_alpha.utils.row_files import overflow_error  # noqa: E402
from Decentralized_FM_alpha.utils.selection import parse_layer_list  # noqa: E402
from sparse_predictor import main_att, main_att_llama, main_mlp, main_mlp_llama  # noqa: E402
from Decentralized_FM_alpha.utils.model_source import family_of_checkpoint  # noqa: E402
from sparse_predictor.trainer.cli import (add_save_dtype_argument, add_training_arguments, resolve_device,  # noqa: E402
                                          split_config, train_and_write)
from sparse_predictor.trainer.labels import BLOCKS, DEFAULT_INPUT, MLP_LABELS, InputSpec, LabelSpec, label_bits, make_label_spec, packed_width, resolve_input  # noqa: E402
from sparse_predictor.trainer.model import TrainConfig  # noqa: E402
from sparse_predictor.trainer.records import RowsSource, summarize  # noqa: E402
from sparse_predictor.trainer.rows import CPU_RESIDENT_BYTES, INPUT_ROW_BYTES_PER_DIM, DeviceRows, RowFile, SplitConfig, document_split, label_row_bytes, layer_data  # noqa: E402

MAIN_DEFAULTS = {("opt", "mlp"): main_mlp.DEFAULTS, ("opt", "att"): main_att.DEFAULTS,
                 ("llama", "mlp"): main_mlp_llama.DEFAULTS, ("llama", "att"): main_att_llama.DEFAULTS}
GPU_BUDGET_SHARE = 0.85  # of free GPU memory once the model is loaded; the rest: forward activations, training
MANIFEST = "online_manifest.json"


# ------------------------------------------------------------------------------------- what to train
@dataclass(frozen=True)
class Predictor:
    block: str
    layer: int
    input: InputSpec
    label: LabelSpec

    @property
    def input_key(self) -> tuple[str, int]:
        return self.input.kind, self.input.layer

    @property
    def label_key(self) -> tuple[str, int]:
        return self.label.source_kind, self.layer


@dataclass(frozen=True)
class RowPlan:
    """Which collected rows exist (the collection's: documents in file order, cut at the capacity) and the split."""
    doc_ids: np.ndarray  # (rows,) document id of each row
    is_test: np.ndarray  # (rows,) bool: held-out rows (whole documents, trainer.document_split)
    docs_done: int
    partial_document: dict | None

    @property
    def rows(self) -> int:
        return len(self.doc_ids)

    @property
    def n_test(self) -> int:
        return int(self.is_test.sum())

    @property
    def n_train(self) -> int:
        return self.rows - self.n_test


def plan_rows(encoded: list[Encoded], capacity: int, split: SplitConfig) -> RowPlan:
    """Rows as ActivationWriter would store them: every real token in document then position order, at most
    `capacity`; a document the capacity cuts is recorded as partial (SPEC §6)."""
    if not encoded:
        raise ValueError("no documents to train on: the request file (after --num-iters) is empty")
    lengths = np.array([len(e.ids) for e in encoded])
    ends = np.cumsum(lengths)
    rows = int(min(ends[-1], capacity))
    doc_ids = np.repeat([e.request.index for e in encoded], lengths)[:rows]
    docs_done = int(np.searchsorted(ends, rows, side="right"))
    stored = rows - (int(ends[docs_done - 1]) if docs_done else 0)
    partial = ({"document": int(encoded[docs_done].request.index), "rows": stored,
                "tokens": int(lengths[docs_done])} if stored > 0 else None)
    is_test = document_split(doc_ids, split.test_fraction, split.test_docs)
    return RowPlan(doc_ids, is_test, docs_done, partial)


def predictors_for(blocks: list[str], layers: list[int], inputs: dict[str, str],
                   labels: dict[str, LabelSpec]) -> list[Predictor]:
    return [Predictor(block, layer, resolve_input(block, inputs[block], layer), labels[block])
            for layer in layers for block in blocks]


def group_bytes(predictors: list[Predictor], dims: ModelDims, plan: RowPlan) -> int:
    """Device bytes of a group's rows: each distinct input once, each predictor's label (bits, held-out scores)."""
    inputs = {p.input_key for p in predictors}
    labels = {p.label_key: dims.width(p.label.source_kind) for p in predictors}
    return (len(inputs) * INPUT_ROW_BYTES_PER_DIM * dims.hidden_size * plan.rows
            + sum(label_row_bytes(w, False) * plan.n_train + label_row_bytes(w, True) * plan.n_test
                  for w in labels.values()))


def size(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.3g} GiB ({n_bytes:,} bytes)"


def plan_groups(predictors: list[Predictor], dims: ModelDims, plan: RowPlan, budget: int) -> list[list[Predictor]]:
    """Consecutive layers (all predictors of a layer together) while their rows fit in `budget` bytes."""
    groups: list[list[Predictor]] = []
    for layer in dict.fromkeys(p.layer for p in predictors):
        own = [p for p in predictors if p.layer == layer]
        need = group_bytes(own, dims, plan)
        if need > budget:
            raise MemoryError(
                f"--memory-budget-gb {size(budget)} is too small for one layer: layer {layer}'s "
                f"{'+'.join(p.block for p in own)} predictors need {size(need)} for {plan.rows} rows "
                f"({plan.n_train} training, {plan.n_test} held-out; float16 inputs, labels as bits, held-out "
                f"scores); raise --memory-budget-gb or lower --collect-tokens")
        if groups and group_bytes(groups[-1] + own, dims, plan) <= budget:
            groups[-1].extend(own)
        else:
            groups.append(own)
    return groups


# ------------------------------------------------------------------------------------- rows kept on the device
class InputRows:
    """One predictor input (a kind of one layer): float16 rows, training and held-out apart."""

    def __init__(self, width: int, plan: RowPlan, device: torch.device):
        self.train = torch.empty((plan.n_train, width), dtype=torch.float16, device=device)
        self.test = torch.empty((plan.n_test, width), dtype=torch.float16, device=device)

    def store(self, train: torch.Tensor, test: torch.Tensor, at: tuple[int, int]) -> None:
        self.train[at[0]:at[0] + len(train)] = train
        self.test[at[1]:at[1] + len(test)] = test


class LabelRows:
    """One predictor's label from one collected kind, by trainer.label_bits as trainer.load_rows computes it from the
    mmap; held-out rows keep their scores."""

    def __init__(self, label: LabelSpec, width: int, plan: RowPlan, device: torch.device):
        self.label, self.width = label, width
        self.train = torch.empty((1, plan.n_train, packed_width(width)), dtype=torch.uint8, device=device)
        self.test = torch.empty((1, plan.n_test, packed_width(width)), dtype=torch.uint8, device=device)
        self.scores = torch.empty((1, plan.n_test, width), dtype=torch.float16, device=device)

    def store(self, train: torch.Tensor, test: torch.Tensor, at: tuple[int, int]) -> None:
        for rows, out, start in ((train, self.train, at[0]), (test, self.test, at[1])):
            if len(rows):
                out[0, start:start + len(rows)], scores = label_bits(self.label, rows)
                if out is self.test:
                    self.scores[0, start:start + len(rows)] = scores.to(torch.float16)


class DeviceCollector:
    """Stands in for ActivationWriter in the *_save blocks (same `kinds`, `save`): keeps the rows of the current
    group's inputs and labels on the device, in the collection's row order, split into training and held-out."""

    def __init__(self, kinds: tuple[str, ...]):
        self.kinds = kinds
        self.plan: RowPlan | None = None
        self.targets: dict[tuple[str, int], list] = {}
        self.rows_done = 0
        self.at = (0, 0)  # next training row, next held-out row

    def start_group(self, plan: RowPlan | None, targets: dict[tuple[str, int], list]) -> None:
        """Keep `targets` (save key -> buffers) for the rows of `plan`, from its first row."""
        self.plan, self.targets, self.rows_done, self.at = plan, targets, 0, (0, 0)

    def begin_batch(self, valid: torch.Tensor) -> None:
        self.batch_rows = min(int(valid.sum()), self.plan.rows - self.rows_done)
        self.index = torch.nonzero(valid.reshape(-1)).squeeze(1)[: self.batch_rows]
        is_test = self.plan.is_test[self.rows_done:self.rows_done + self.batch_rows]
        self.test_rows = torch.from_numpy(np.flatnonzero(is_test)).to(valid.device)
        self.train_rows = None if not is_test.any() else torch.from_numpy(np.flatnonzero(~is_test)).to(valid.device)
        self.nonfinite: list[tuple[str, int, torch.Tensor]] = []

    def save(self, kind: str, layer: int, values: torch.Tensor) -> None:
        targets = self.targets.get((kind, layer))
        if not targets or self.batch_rows == 0:
            return
        rows = values.reshape(-1, values.shape[-1]).index_select(0, self.index).to(torch.float16)
        self.nonfinite.append((kind, layer, ~torch.isfinite(rows).all(dim=1)))  # checked once a batch: no sync here
        train = rows if self.train_rows is None else rows.index_select(0, self.train_rows)
        test = rows.index_select(0, self.test_rows)
        for target in targets:
            target.store(train, test, self.at)

    def end_batch(self) -> None:
        """Refuse float16 overflow as the collection does (the first bad save of the batch), then advance."""
        if self.nonfinite and bool(torch.stack([bad.any() for _, _, bad in self.nonfinite]).any()):
            kind, layer, bad = next(entry for entry in self.nonfinite if bool(entry[2].any()))
            raise overflow_error(f"{kind} of layer {layer}", self.rows_done + int(bad.nonzero()[0, 0]))
        n_test = len(self.test_rows)
        self.at = (self.at[0] + self.batch_rows - n_test, self.at[1] + n_test)
        self.rows_done += self.batch_rows

    @property
    def full(self) -> bool:
        return self.rows_done >= self.plan.rows


def keep_group(group: list[Predictor], dims: ModelDims, plan: RowPlan, device: torch.device):
    """The group's device buffers: inputs by (kind, layer), labels by (source kind, layer), and the save targets."""
    inputs = {p.input_key: InputRows(dims.hidden_size, plan, device) for p in group}
    labels = {p.label_key: LabelRows(p.label, dims.width(p.label.source_kind), plan, device) for p in group}
    targets: dict[tuple[str, int], list] = {}
    for key, rows in [*inputs.items(), *labels.items()]:
        targets.setdefault(key, []).append(rows)
    return inputs, labels, targets


@torch.no_grad()
def forward_group(pipe: DistInferenceMaskTokenPipeSync, encoded: list[Encoded], batches: list[list[int]],
                  collector: DeviceCollector, last_layer: int, desc: str) -> None:
    """The collection's forward pass up to `last_layer` (no LM head: nothing downstream of the rows is needed)."""
    for positions in tqdm(batches, desc=desc, unit="batch"):
        ids, valid = pipe.pad([encoded[p] for p in positions])
        collector.begin_batch(valid)
        x = pipe.embeddings(ids, 0)
        bias = pipe.attention_bias(valid, 0)
        for block in pipe.blocks[: last_layer + 1]:
            x, _ = block(x, bias, None)
        collector.end_batch()
        if collector.full:
            break
    if not collector.full:
        raise RuntimeError(f"the forward pass kept {collector.rows_done} rows, the plan has {collector.plan.rows}")


def layer_rows(p: Predictor, inputs: dict, labels: dict, dims: ModelDims, plan: RowPlan, split: SplitConfig):
    """A predictor's LayerData from the group's buffers, exactly as trainer.load_layer builds it from the mmaps."""
    x, y = inputs[p.input_key], labels[p.label_key]
    train = DeviceRows(x.train, y.train, y.width, None)
    test = DeviceRows(x.test, y.test, y.width, y.scores)
    files = {p.label.source_kind: RowFile(None, y.width, plan.rows)}  # no path: nothing was stored
    return layer_data(p.input, RowFile(None, dims.hidden_size, plan.rows), files, (p.label,), plan.is_test, test,
                      train, plan.n_train, plan.doc_ids, split)


# ------------------------------------------------------------------------------------- settings and resumption
def block_settings(args: argparse.Namespace, block: str, source: dict) -> dict:
    """Everything that decides a predictor's result; a rerun skips a predictor whose JSON records the same."""
    label = args.labels[block]
    return {"source": source, "block": block, "input": args.inputs[block], "label": label.name, "k": label.k,
            "threshold": label.threshold, "lr": args.lrs[block], **{key: getattr(args, key) for key in (
                "D", "epochs", "batch_size", "seed", "seeds", "selection", "test_fraction", "test_docs",
                "no_cuda_graphs", "save_dtype")}}


def already_trained(out_dir: Path, p: Predictor, settings: dict) -> bool:
    json_path, checkpoint = out_dir / f"{p.block}_layer{p.layer}.json", out_dir / f"{p.block}_layer{p.layer}.pt"
    if not (json_path.is_file() and checkpoint.is_file()):
        return False
    return (read_json(json_path).get("data", {}).get("online") or {}).get("settings") == settings


# ------------------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = p.add_argument_group("model and documents (as the collection run: dist_inference_runner.py *-save)")
    model.add_argument("--model-name", required=True, help="converted checkpoint directory (SPEC §3), OPT or Llama")
    model.add_argument("--infer-data", required=True, help="request JSONL of echo requests, one document a line")
    model.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default=None,
                       help="compute dtype of the model (default bf16 on CUDA, fp32 on the CPU)")
    model.add_argument("--max-seq-len", type=int, default=None,
                       help="longer documents are truncated from the left, keeping the BOS (default: the model's)")
    model.add_argument("--collect-tokens", type=int, default=DEFAULT_CAPACITY,
                       help="rows: the first N real tokens of the documents, in file order (default %(default)s)")
    model.add_argument("--token-micro-batch-size", type=int, default=4, help="most documents in one forward batch")
    model.add_argument("--budget", type=int, default=65536, help="most padded tokens in one forward batch")
    model.add_argument("--num-iters", type=int, default=None, help="use only the first N documents")
    what = p.add_argument_group("predictors (as the mains: main_mlp*.py, main_att*.py)")
    what.add_argument("--model", default=None, help="names the run in the JSONs (default: the --model-name folder)")
    what.add_argument("--dataset", default="c4", help="names the documents, as the mains (default %(default)s)")
    what.add_argument("--out-dir", default=None, help="{mlp,att}_layer{L}.pt/.json, summaries, online_manifest.json "
                                                      "(default data/<model>_<dataset>_sparse_predictor)")
    what.add_argument("--blocks", default="mlp,att", help="comma list of mlp, att (default %(default)s)")
    what.add_argument("--L", default="all", help="layers: an index, a list such as 0-13 or 0,4,8, or all (default "
                                                "%(default)s)")
    what.add_argument("--mlp-input", default=DEFAULT_INPUT["mlp"], help="MLP predictor input: same (mlp_x_l), "
                      "lookahead (att_x_l) or from:J (att_x_J) (default %(default)s)")
    what.add_argument("--att-input", default=DEFAULT_INPUT["att"], help="attention predictor input: same (att_x_l), "
                      "lookahead (att_x_{l-1}, att_x_0 for layer 0) or from:J (default %(default)s)")
    what.add_argument("--label", choices=MLP_LABELS, default=None,
                      help="MLP label as main_mlp*.py --label (default: OPT relu, Llama topk)")
    what.add_argument("--k", type=float, default=None, help="MLP --label topk fraction (default: Llama 0.5)")
    what.add_argument("--threshold", type=float, default=None, help="MLP --label threshold cut")
    what.add_argument("--att-k", type=float, default=None, help="attention top fraction of heads (default 0.3)")
    what.add_argument("--mlp-lr", type=float, default=None, help="MLP learning rate (default: the main's, 1e-3)")
    what.add_argument("--att-lr", type=float, default=None, help="attention learning rate (default: the main's, 1e-4)")
    add_training_arguments(p, lr=None, streaming=False)
    add_save_dtype_argument(p)
    p.add_argument("--memory-budget-gb", type=float, default=None,
                   help="device memory for the kept rows of one group of layers (the more layers fit, the fewer "
                        f"forward passes). Default {GPU_BUDGET_SHARE:.0%}% of the GPU memory free once the model is "
                        f"loaded, {CPU_RESIDENT_BYTES >> 30} GiB on the CPU")
    return p


def resolve_args(args: argparse.Namespace, family: str, dims: ModelDims) -> None:
    """Family defaults from the mains, validated label specs, the layer list, default names and paths."""
    blocks = [b.strip() for b in args.blocks.split(",") if b.strip()]
    if not blocks or set(blocks) - set(BLOCKS):
        raise ValueError(f"--blocks {args.blocks!r}: a comma list of {', '.join(BLOCKS)}")
    args.block_list = blocks
    mlp, att = MAIN_DEFAULTS[(family, "mlp")], MAIN_DEFAULTS[(family, "att")]
    args.label = args.label or mlp["label"]
    if args.label == "topk" and args.k is None:
        args.k = mlp["k"]
    if args.label == "gate" and family != "llama":
        raise ValueError("--label gate needs a gate projection: Llama only (OPT's MLP is fc1 -> ReLU)")
    args.att_k = att["k"] if args.att_k is None else args.att_k
    args.lrs = {"mlp": args.mlp_lr or mlp["lr"], "att": args.att_lr or att["lr"]}
    args.inputs = {"mlp": args.mlp_input, "att": args.att_input}
    args.labels = {"mlp": make_label_spec("mlp", args.label, args.k, args.threshold, dims.ffn_dim),
                   "att": make_label_spec("att", "topk", args.att_k, None, dims.num_heads)}
    args.layers = parse_layer_list(args.L, dims.num_layers)
    if args.seeds < 1:
        raise ValueError(f"--seeds {args.seeds}: need at least 1")
    args.model = args.model or Path(args.model_name).resolve().name
    args.out_dir = args.out_dir or str(Path(__file__).resolve().parents[1] / "data" /
                                       f"{args.model}_{args.dataset}_sparse_predictor")


def load_pipeline(args: argparse.Namespace, family: str, last_layer: int, collector: DeviceCollector,
                  device: torch.device) -> DistInferenceMaskTokenPipeSync:
    """The runner's model pieces with the *_save blocks, their writer replaced by the collector."""
    pipe_args = argparse.Namespace(model_name=args.model_name, model_type=f"{family}-save", dtype=args.dtype,
                                   max_layers=last_layer + 1, num_layers=None, max_seq_len=args.max_seq_len,
                                   seed=args.seed, sort_requests="file", budget=args.budget,
                                   token_micro_batch_size=args.token_micro_batch_size)
    return DistInferenceMaskTokenPipeSync(pipe_args, SingleProcessComm(), device,
                                          block_kwargs=lambda pipe: {"writer": collector})


def recorded_args(args: argparse.Namespace) -> dict:
    """The flags and what they resolved to, as JSON (label specs by their fields)."""
    return {**vars(args), "labels": {block: asdict(label) for block, label in args.labels.items()}}


def memory_budget(args: argparse.Namespace, device: torch.device) -> int:
    if args.memory_budget_gb is not None:
        return int(args.memory_budget_gb * 2**30)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0] * GPU_BUDGET_SHARE)
    return CPU_RESIDENT_BYTES


def main(argv: list[str] | None = None) -> list[Path]:
    """Train the predictors; returns the JSONs written by this run (skipped ones not included)."""
    started = time.perf_counter()
    args = build_parser().parse_args(argv)
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    args.dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    family = family_of_checkpoint(args.model_name)
    config = AutoConfig.from_pretrained(args.model_name)
    dims = model_module(f"{family}-save")[1].collection_dims(config)
    resolve_args(args, family, dims)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    split = split_config(args)
    requests = read_requests(args.infer_data)[: args.num_iters]
    if any(r.max_tokens != 0 for r in requests):
        raise ValueError(f"{args.infer_data}: online training needs echo requests (max_tokens 0) only, as collection")
    predictors = predictors_for(args.block_list, args.layers, args.inputs, args.labels)
    kinds = tuple(dict.fromkeys(k for p in predictors for k in (p.input.kind, p.label.source_kind)))
    source = {"model_name": str(Path(args.model_name).resolve()), "infer_data_sha256": file_sha256(args.infer_data),
              "collect_tokens": args.collect_tokens, "num_iters": args.num_iters, "dtype": args.dtype,
              "max_seq_len": args.max_seq_len, "token_micro_batch_size": args.token_micro_batch_size,
              "budget": args.budget}
    settings = {b: block_settings(args, b, source) for b in args.block_list}
    todo = [p for p in predictors if not already_trained(out_dir, p, settings[p.block])]
    if len(todo) < len(predictors):
        print(f"skipping {len(predictors) - len(todo)} predictors already written with these settings in {out_dir}")
    collector = DeviceCollector(kinds)
    pipe = load_pipeline(args, family, max(p.layer for p in predictors), collector, device)
    encoded = [pipe.encode(r) for r in requests]
    plan = plan_rows(encoded, args.collect_tokens, split)
    budget = memory_budget(args, device)
    groups = plan_groups(todo, dims, plan, budget) if todo else []
    batches = list(pipe.batches(encoded, list(range(len(encoded)))))
    manifest = base_manifest(
        collection="online", note="no activation file is written: rows live on the device for one group at a time",
        model_name=args.model_name, model_type=family, dtype=args.dtype, max_seq_len=pipe.max_seq_len,
        source_data={"path": str(Path(args.infer_data).resolve()), "sha256": source["infer_data_sha256"]},
        tokenizer=pipe.bos, weights=weights_provenance(args.model_name), config=asdict(dims),
        capacity=args.collect_tokens, rows=plan.rows, rows_train=plan.n_train, rows_test=plan.n_test,
        docs_done=plan.docs_done, partial_document=plan.partial_document, split=split.describe(),
        test_documents=[int(d) for d in np.unique(plan.doc_ids[plan.is_test])],
        memory_budget_bytes=budget, truncated_prompts=pipe.truncated_prompts, settings=settings, groups=[],
        complete=False)
    write_json_atomic(out_dir / MANIFEST, manifest)
    rows_source = RowsSource("online", None, plan.rows, dims, plan.doc_ids, {
        "model_name": args.model_name, "model_type": family, "source_data": manifest["source_data"],
        "git_commit": manifest["git_commit"], "weights": manifest["weights"], "tokenizer": pipe.bos,
        "partial_document": plan.partial_document})
    written = []
    for g, group in enumerate(groups):
        inputs, labels, targets = keep_group(group, dims, plan, device)
        collector.start_group(plan, targets)
        start = time.perf_counter()
        last_layer = max(p.layer for p in group)
        forward_group(pipe, encoded, batches, collector, last_layer,
                      f"group {g + 1}/{len(groups)}: forward to layer {last_layer}")
        forward_s = time.perf_counter() - start
        layers = sorted({p.layer for p in group})
        print(f"group {g + 1}/{len(groups)}: layers {layers[0]}-{layers[-1]}, {plan.rows} rows kept "
              f"({group_bytes(group, dims, plan) / 2**30:.2f} GiB) in {forward_s:.1f} s")
        for p in group:
            print("=" * 40, p.block, "layer", p.layer, "=" * 40)
            data = layer_rows(p, inputs, labels, dims, plan, split)
            cfg = TrainConfig(D=args.D, epochs=args.epochs, batch_size=args.batch_size, lr=args.lrs[p.block],
                              seed=args.seed, selection=args.selection, cuda_graphs=not args.no_cuda_graphs)
            block_source = replace(rows_source, fields={**rows_source.fields, "online": {
                "manifest": MANIFEST, "settings": settings[p.block], "group": layers, "group_forward_s": forward_s}})
            written.append(train_and_write(args, p.block, p.layer, data, block_source, cfg, forward_s,
                                           base_manifest(args=recorded_args(args)),
                                           {"load": "the group's forward pass, shared by its predictors"}))
            del data
        manifest["groups"].append({"layers": layers, "predictors": [f"{p.block}{p.layer}" for p in group],
                                   "bytes": group_bytes(group, dims, plan), "forward_s": forward_s,
                                   "train_s": time.perf_counter() - start - forward_s})
        manifest["peak_host_rss_bytes"] = peak_rss_bytes()
        write_json_atomic(out_dir / MANIFEST, manifest)
        del inputs, labels, targets
        collector.start_group(None, {})
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for block in args.block_list:
        csv_path, md_path, _ = summarize(out_dir, block)
        print(f"wrote {csv_path} and {md_path}")
    manifest.update(complete=True, end_time=now(), seconds=time.perf_counter() - started,
                    peak_host_rss_bytes=peak_rss_bytes(),
                    peak_device_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None)
    write_json_atomic(out_dir / MANIFEST, manifest)
    print(f"trained {len(todo)} predictors ({len(predictors) - len(todo)} already there) online in "
          f"{len(groups)} forward passes over {plan.rows} rows -> {out_dir} ({time.perf_counter() - started:.1f} s)")
    return written


if __name__ == "__main__":
    main()

"""The predictor, its stacked training step (CUDA graphs), the training loop and held-out evaluation."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from Decentralized_FM_alpha.utils import work
from Decentralized_FM_alpha.utils.activation_store import iter_row_chunks
from sparse_predictor.trainer.metrics import aggregate_statistics, batch_statistics, per_document_counts
from sparse_predictor.trainer.rows import DeviceRows, LayerData

NEGATIVE_WEIGHT_FLOOR = {"mlp": 0.005, "att": 0.0}  # trainer_mlp.py adds 0.005 to w, trainer_att.py does not
WEIGHT_DECAY = 0.01
EARLY_STOP_PATIENCE = 5
EARLY_STOP_RECALL = 0.99
SELECTIONS = {
    "original": "keep the epoch with the best held-out Recall (epoch 0 = untrained) and stop after 5 epochs without "
                "improvement or once it exceeds 0.99, as the original trainer; the reported metrics then come from "
                "the split that chose the epoch",
    "last": "train all --epochs and keep the last epoch: no choice made on the held-out split",
}


def matmul_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA; float32 on the CPU, where bf16 matmuls are slow (and the tests run)."""
    return torch.bfloat16 if device.type == "cuda" else None


def predictor_logits(model: torch.nn.Module, x: torch.Tensor, amp_dtype: torch.dtype | None) -> torch.Tensor:
    """(P, B, out) float32 logits of the stacked predictors; under autocast the matmuls run in amp_dtype with
    float32 master weights. x is (B, d), shared by all predictors, or (P, B, d)."""
    if amp_dtype is None:
        return model(x.float())
    with torch.autocast(device_type=x.device.type, dtype=amp_dtype, cache_enabled=False):  # graph-capture safe
        return model(x).float()




@torch.no_grad()
def evaluate(model: torch.nn.Module, test: DeviceRows, labels_of: Sequence[int], Ks: Sequence[int],
             weight_floor: float, batch_size: int, amp_dtype: torch.dtype | None,
             documents: np.ndarray | None = None, magnitudes: Sequence[bool] | None = None) -> list[dict]:
    """Held-out metrics of each stacked predictor (predictor p is scored on label labels_of[p]), in eval batches of
    batch_size rows in row order as the original's test loader; with `documents`, also the per-document counts.
    magnitudes[l]: label l ranks by |value| (LabelSpec.ranks_by_magnitude), so its Captured Mass is defined."""
    model.eval()
    work.count_evaluation(sum(p.numel() for p in model.parameters()), test.n)
    batches: list[list[dict]] = [[] for _ in labels_of]
    for s in iter_row_chunks(test.n, batch_size):
        logits = predictor_logits(model, test.x[s], amp_dtype)  # (P, b, out)
        for p, l in enumerate(labels_of):
            top = (test.true_kth[l, s], test.true_room[l, s])
            batches[p].append(batch_statistics(logits[p], test.label_rows(l, s), test.scores[l, s], Ks[l], weight_floor,
                                               top))
    model.train()
    metrics = [aggregate_statistics(b, Ks[l], magnitudes is None or magnitudes[l]) for b, l in zip(batches, labels_of)]
    if documents is not None:
        for m, b in zip(metrics, batches):
            m["per_document"] = per_document_counts(b, documents)
    return metrics


@dataclass(frozen=True)
class TrainConfig:
    D: int = 1000
    epochs: int = 20
    batch_size: int = 1024
    lr: float = 1e-4
    seed: int = 0
    selection: str = "original"  # or "last": see SELECTIONS
    cuda_graphs: bool = True  # replay each training step from a captured CUDA graph (CUDA only)
    activation: str | None = None  # None: DejaVu's linear low-rank predictor; relu / gelu: one hidden nonlinearity


@dataclass
class TrainResult:
    state_dict: dict[str, torch.Tensor]
    metrics: dict  # of the kept (best) model
    best_epoch: int  # 0 = the untrained model
    history: list[dict]  # per epoch: held-out metrics, train loss, seconds
    per_document: dict[str, list[int]]  # held-out counts per document of the kept model (for bootstrap intervals)
    seed: int
    label_index: int


ACTIVATIONS = {"relu": torch.nn.ReLU, "gelu": torch.nn.GELU}


def make_predictor(d: int, D: int, out: int, seed: int, activation: str | None = None) -> torch.nn.Sequential:
    """DejaVu's Linear(d, D) -> Linear(D, out) without bias; with `activation`, that nonlinearity in between (the
    upper-bound variant of the capacity curves: the same width, one hidden nonlinearity)."""
    torch.manual_seed(seed)  # built on the CPU so that a seed gives the same weights on any device
    first, second = torch.nn.Linear(d, D, bias=False), torch.nn.Linear(D, out, bias=False)
    return torch.nn.Sequential(first, *([ACTIVATIONS[activation]()] if activation else []), second)


def predictor_layers(activation: str | None) -> list[str]:
    return ["Linear(d, D, bias=False)", *([f"{ACTIVATIONS[activation].__name__}()"] if activation else []),
            "Linear(D, out, bias=False)"]


class StackedPredictors(torch.nn.Module):
    """P independent DejaVu predictors, Linear(d, D) -> Linear(D, out) without bias, trained in lockstep.

    Each one is initialised exactly as make_predictor(d, D, out, seed) and AdamW updates every weight on its own, so
    stacking changes nothing but the kernels: one batched matmul instead of P small ones (at DejaVu's sizes a
    training step is bound by kernel launches, not arithmetic, so seeds and label variants come almost for free).
    With `activation`, every predictor has that nonlinearity between its two layers (make_predictor's variant).
    """

    def __init__(self, d: int, D: int, out: int, seeds: Sequence[int], activation: str | None = None):
        super().__init__()
        singles = [make_predictor(d, D, out, seed, activation) for seed in seeds]
        self.w1 = torch.nn.Parameter(torch.stack([m[0].weight.detach() for m in singles]))  # (P, D, d)
        self.w2 = torch.nn.Parameter(torch.stack([m[-1].weight.detach() for m in singles]))  # (P, out, D)
        self.activation = ACTIVATIONS[activation]() if activation else None
        self.second = len(singles[0]) - 1  # index of the second Linear in make_predictor's Sequential

    def layer_weights(self) -> tuple[int, int]:
        """Weights of the two layers of all stacked predictors (the work counters, utils/work.py)."""
        return self.w1.numel(), self.w2.numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.matmul(x, self.w1.transpose(1, 2))  # (P, B, D)
        if self.activation is not None:
            h = self.activation(h)
        return torch.matmul(h, self.w2.transpose(1, 2))  # (P, B, out)

    def state_of(self, p: int) -> dict[str, torch.Tensor]:
        """Predictor p as the state dict of make_predictor's Sequential (the sparse runner loads the linear one:
        keys 0.weight, 1.weight)."""
        return {"0.weight": self.w1[p].detach().to("cpu", copy=True),
                f"{self.second}.weight": self.w2[p].detach().to("cpu", copy=True)}

    @torch.no_grad()
    def load_states(self, states: Sequence[dict[str, torch.Tensor]]) -> None:
        for p, state in enumerate(states):
            self.w1[p].copy_(state["0.weight"])
            self.w2[p].copy_(state[f"{self.second}.weight"])


def stacked_bce(logits: torch.Tensor, y: torch.Tensor, weight_floor: float) -> torch.Tensor:
    """(P,) class-weighted BCE of each predictor on its own batch, w = its batch's mean(y) + floor (the original)."""
    w = y.mean(dim=(1, 2), keepdim=True) + weight_floor
    loss = F.binary_cross_entropy_with_logits(logits, y, weight=y * (1 - w) + w, reduction="none")
    return loss.mean(dim=(1, 2))


class TrainStep:
    """One optimizer step (forward, class-weighted BCE, backward, AdamW) of the stacked predictors on a batch
    (x (P, B, d), labels (P, B, out)); returns the (P,) losses. The sum of the P losses is minimised, so each
    predictor gets exactly its own gradient.

    On CUDA with `graphs`, the full-batch step is captured once in a CUDA graph and replayed (a partial last batch
    runs eagerly): a step is ~40 small kernels, and at 1,024 rows launching them from Python costs more than
    running them. Eager and replayed steps share weights and optimizer state in place. Capture needs
    warm-up steps; they run on copies of the weights and optimizer state, which are put back before training, so
    the graph path takes exactly the eager path's steps."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, amp_dtype: torch.dtype | None,
                 floor: float, graphs: bool, batch_size: int):
        self.model, self.optimizer, self.amp_dtype, self.floor = model, optimizer, amp_dtype, floor
        self.graphs, self.batch_size = graphs, batch_size
        self.layer_weights = model.layer_weights()  # of all stacked predictors (work.py)
        self.captured: tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def eager(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        losses = stacked_bce(predictor_logits(self.model, x, self.amp_dtype), labels.float(), self.floor)
        self.optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()
        self.optimizer.step()
        return losses.detach()

    def __call__(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        work.count_training_step(*self.layer_weights, x.shape[1])
        if not self.graphs or x.shape[1] != self.batch_size:
            return self.eager(x, labels)
        if self.captured is None:
            self.captured = self.capture(x, labels)
        graph, static_x, static_labels, static_loss = self.captured
        static_x.copy_(x)
        static_labels.copy_(labels)
        graph.replay()
        return static_loss.clone()

    def capture(self, x: torch.Tensor, labels: torch.Tensor):
        static_x, static_labels = x.clone(), labels.clone()
        saved = self.snapshot()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # warm-up: allocations, lazy optimizer state, kernel selection
                self.eager(static_x, static_labels)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        self.optimizer.zero_grad(set_to_none=True)  # the captured backward writes fresh gradients every replay
        with torch.cuda.graph(graph):
            static_loss = self.eager(static_x, static_labels)
        self.restore(saved)
        return graph, static_x, static_labels, static_loss

    def snapshot(self) -> tuple[list[torch.Tensor], dict]:
        params = [p.detach().clone() for p in self.model.parameters()]
        state = {id(p): {k: v.clone() for k, v in st.items() if torch.is_tensor(v)}
                 for p, st in self.optimizer.state.items()}
        return params, state

    def restore(self, saved: tuple[list[torch.Tensor], dict]) -> None:
        """Put weights and optimizer state back in place (the graph holds their addresses)."""
        params, state = saved
        with torch.no_grad():
            for p, old in zip(self.model.parameters(), params):
                p.copy_(old)
            for p, st in self.optimizer.state.items():
                before = state.get(id(p), {})
                for k, v in st.items():
                    if torch.is_tensor(v):
                        v.copy_(before[k]) if k in before else v.zero_()  # no state yet = zeros, step 0


def train_stacked(data: LayerData, block: str, cfg: TrainConfig, specs: Sequence[tuple[int, int]],
                  log: Callable[[str], None] = print, model: torch.nn.Module | None = None) -> list[TrainResult]:
    """Train one predictor per (label index, seed) of `specs` on the layer's input, all in lockstep.

    Each predictor has its own initialisation, batch order (its seed's generator), optimizer state, held-out metrics
    and selection (--selection), exactly as if trained alone with that seed; streamed windows (rows that do not fit
    on the device) come in the order of cfg.seed for all of them. `model`: other stacked predictors to train the
    same way instead of DejaVu's (one per spec; with layer_weights, state_of and load_states as StackedPredictors,
    e.g. modules/structured_predictor.py); cfg.epochs 0 scores them untrained."""
    device = data.test.x.device
    amp_dtype = matmul_dtype(device)
    floor = NEGATIVE_WEIGHT_FLOOR[block]
    labels_of, seeds = [l for l, _ in specs], [seed for _, seed in specs]
    P = len(specs)
    if model is None:
        model = StackedPredictors(data.x_file.width, cfg.D, data.out_width, seeds, cfg.activation)
    model = model.to(device)
    graphs = cfg.cuda_graphs and device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), cfg.lr, weight_decay=WEIGHT_DECAY, fused=device.type == "cuda",
                                  capturable=graphs)
    step = TrainStep(model, optimizer, amp_dtype, floor, graphs, cfg.batch_size)
    generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]
    label_index = torch.tensor(labels_of, device=device)[:, None]  # (P, 1): which label rows each predictor reads

    def held_out(documents: np.ndarray | None = None) -> list[dict]:
        return evaluate(model, data.test, labels_of, data.Ks, floor, cfg.batch_size, amp_dtype, documents,
                        [label.ranks_by_magnitude for label in data.labels])

    best = held_out()
    log(f"[Start] {format_metrics(best[0])}" + (f" (and {P - 1} more predictors)" if P > 1 else ""))
    best_states = [model.state_of(p) for p in range(P)]
    best_epochs, histories, no_improve, active = [0] * P, [[] for _ in range(P)], [0] * P, [True] * P
    for epoch in tqdm(range(1, cfg.epochs + 1), desc="epochs", unit="epoch"):
        start = time.perf_counter()
        loss_sum, steps = torch.zeros(P, device=device), 0
        for rows in data.train_windows(epoch, cfg.seed):
            order = torch.stack([torch.randperm(rows.n, device=device, generator=g) for g in generators])  # (P, n)
            for index in order.split(cfg.batch_size, dim=1):  # (P, B)
                loss_sum += step(rows.x[index], rows.label_rows(label_index, index))
                steps += 1
            del rows  # a streamed window is freed before the next one is loaded
        train_loss = (loss_sum / steps).tolist()  # the epoch's only host sync
        train_s = time.perf_counter() - start
        metrics = held_out()
        eval_s = time.perf_counter() - start - train_s
        for p in range(P):
            if not active[p]:
                continue
            histories[p].append({"epoch": epoch, "train_loss": train_loss[p], "train_s": train_s, "eval_s": eval_s,
                                 **metrics[p]})
            if cfg.selection == "last":
                best[p], best_epochs[p] = metrics[p], epoch
            elif metrics[p]["Recall"] is not None and (best[p]["Recall"] is None or
                                                       metrics[p]["Recall"] > best[p]["Recall"]):
                best[p], best_epochs[p], no_improve[p] = metrics[p], epoch, 0
                best_states[p] = model.state_of(p)
            else:
                no_improve[p] += 1
            stop = no_improve[p] >= EARLY_STOP_PATIENCE or (best[p]["Recall"] or 0) > EARLY_STOP_RECALL
            active[p] = not (cfg.selection == "original" and stop)
        log(f"[Epoch {epoch}] train loss {train_loss[0]:.4f} ({train_s:.2f} s) [Valid] {format_metrics(metrics[0])}")
        if not any(active):
            break
    if cfg.selection == "last":
        best_states = [model.state_of(p) for p in range(P)]
    model.load_states(best_states)
    final = held_out(data.test_documents)  # the kept predictors once more, with per-document counts
    return [TrainResult(best_states[p], best[p], best_epochs[p], histories[p], final[p]["per_document"], seeds[p],
                        labels_of[p]) for p in range(P)]


def train_predictor(data: LayerData, block: str, cfg: TrainConfig, log: Callable[[str], None] = print) -> TrainResult:
    """One predictor of the layer's first label, seeded with cfg.seed."""
    return train_stacked(data, block, cfg, [(0, cfg.seed)], log)[0]


def format_metrics(metrics: dict) -> str:
    def show(v) -> str:
        return "n/a" if v is None else str(v) if isinstance(v, int) else f"{v:.4f}"

    return " ".join(f"{k}: {show(v)}" for k, v in metrics.items())

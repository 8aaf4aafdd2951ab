"""DejaVu sparse-predictor training, shared by main_mlp.py / main_att.py and their Llama twins (SPEC §7).

Everything that is not model-specific lives here once, one module per idea:
    labels.py   what a predictor reads (same / lookahead / from:J) and predicts (relu, topk, threshold, gate), as bits
    rows.py     the document split, streaming reads from the mmaps, a layer's rows on the device
    metrics.py  the original's held-out metrics, Recall@K at equal budget, per-document counts
    model.py    the predictor, its stacked CUDA-graph training step, the training loop and evaluation
    records.py  checkpoint + JSON per layer, seed spreads, {block}_summary.csv/.md
    cli.py      the command line of the four mains
    launch.py   the run_c4_*.sh helpers (`launch`: every layer over all visible GPUs; `summarize`)

Behaviour kept from the original (FMInference/DejaVu sparse_predictor/main_{mlp,att}.py, trainer_{mlp,att}.py):
  - predictor Linear(d, D, bias=False) -> Linear(D, out, bias=False), PyTorch's default init, AdamW(wd 0.01);
  - class-weighted BCE: w = mean(y) over the batch (+0.005 for the MLP, +0 for attention); weight 1 on
    active units, w on inactive ones;
  - a unit is predicted active when sigmoid(logit) >= 0.5; the held-out split is evaluated before training and
    after every epoch; the kept model is the one with the best held-out Recall, and training stops after 5
    epochs without improvement or once that Recall exceeds 0.99 (--selection original, the default; --selection
    last trains all epochs and keeps the last, choosing nothing on the held-out split);
  - 95/5 split, the held-out part taken from the end of the collection (here: whole documents, no leak).
Deliberate differences: the BCE is computed from logits (stable; equal to the original's BCE(sigmoid(.)) except
where the original clamps log at -100), matmuls run under bf16 autocast on CUDA, whole batches are gathered on
the device instead of a per-sample DataLoader, and no run stops on an all-zero label row.
"""

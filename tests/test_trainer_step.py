"""The training step: snapshot/restore puts weights and optimizer state back exactly (CUDA-graph warm-up), and
stacked predictors train exactly as the same predictors trained one at a time."""
import numpy as np
import torch

from sparse_predictor.trainer.labels import InputSpec, make_label_spec
from sparse_predictor.trainer.model import StackedPredictors, TrainConfig, TrainStep, make_predictor, train_stacked
from sparse_predictor.trainer.rows import DeviceRows, LayerData, RowFile


def test_restore_returns_weights_and_adam_state_to_the_snapshot():
    torch.manual_seed(0)
    model = StackedPredictors(16, 8, 32, seeds=[1, 2])
    optimizer = torch.optim.AdamW(model.parameters(), 1e-2, weight_decay=0.01)
    step = TrainStep(model, optimizer, None, 0.005, graphs=False, batch_size=4)
    x, y = torch.randn(2, 4, 16), torch.rand(2, 4, 32) > 0.7
    step(x, y)  # state exists now
    saved = step.snapshot()
    expected_params = [p.detach().clone() for p in model.parameters()]
    expected_state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}
    for _ in range(3):
        step(x, y)
    assert not torch.equal(next(model.parameters()), expected_params[0])
    step.restore(saved)
    assert all(torch.equal(p, e) for p, e in zip(model.parameters(), expected_params))
    for p, s in optimizer.state.items():
        assert all(torch.equal(v, expected_state[id(p)][k]) for k, v in s.items())


def test_restore_of_a_fresh_optimizer_zeroes_its_state():
    model = StackedPredictors(16, 8, 32, seeds=[1])
    optimizer = torch.optim.AdamW(model.parameters(), 1e-2)
    step = TrainStep(model, optimizer, None, 0.005, graphs=False, batch_size=4)
    saved = step.snapshot()  # before any step: no optimizer state
    step(torch.randn(1, 4, 16), torch.rand(1, 4, 32) > 0.5)
    step.restore(saved)
    assert all(float(v.abs().sum()) == 0 for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))


def test_stacked_predictor_starts_as_make_predictor():
    stacked = StackedPredictors(16, 8, 32, seeds=[5, 9])
    for p, seed in enumerate([5, 9]):
        single = make_predictor(16, 8, 32, seed)
        assert torch.equal(stacked.state_of(p)["0.weight"], single[0].weight)
        assert torch.equal(stacked.state_of(p)["1.weight"], single[1].weight)


def synthetic_layer(n_train: int, n_test: int, d: int, out: int) -> LayerData:
    """A resident layer with two labels (top 25% and top 50% of a low-rank map of x), documents of 20 rows."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n_train + n_test, d, generator=g)
    values = (x @ torch.randn(d, 4, generator=g)) @ torch.randn(4, out, generator=g)
    labels = [make_label_spec("mlp", "topk", k, None, out) for k in (0.25, 0.5)]
    scores = values.abs()
    label_rows = torch.stack([l.labels(scores) for l in labels])

    def rows(part: slice, keep_scores: bool) -> DeviceRows:
        return DeviceRows.of(x[part].half(), label_rows[:, part],
                             torch.stack([scores[part].half()] * 2) if keep_scores else None)

    is_test = np.zeros(n_train + n_test, dtype=bool)
    is_test[n_train:] = True
    files = {"mlp_label": RowFile(None, out, n_train + n_test)}
    Ks = tuple(l.top_count(out) for l in labels)
    test = rows(slice(n_train, None), True)
    test.rank_truth(Ks)
    return LayerData(InputSpec("same", "mlp_x", 0), RowFile(None, d, n_train + n_test), files, tuple(labels), is_test,
                     test, Ks, rows(slice(0, n_train), False), n_train, np.arange(n_test) // 20)


def test_stacked_training_equals_training_each_predictor_alone():
    data = synthetic_layer(600, 200, 16, 24)
    cfg = TrainConfig(D=12, epochs=3, batch_size=64, lr=3e-3, selection="original")
    specs = [(0, 1), (1, 1), (0, 7)]  # two labels, two seeds
    together = train_stacked(data, "mlp", cfg, specs, log=lambda _: None)
    for spec, result in zip(specs, together):
        [alone] = train_stacked(data, "mlp", cfg, [spec], log=lambda _: None)
        for key in ("0.weight", "1.weight"):
            assert torch.allclose(result.state_dict[key], alone.state_dict[key], atol=1e-5), (spec, key)
        assert result.best_epoch == alone.best_epoch and len(result.history) == len(alone.history)
        assert abs(result.metrics["Recall@K"] - alone.metrics["Recall@K"]) <= 1e-3
        assert abs(sum(result.per_document["topk_hits"]) - sum(alone.per_document["topk_hits"])) <= 2  # a tie
    assert together[0].metrics["K"] == 6 and together[1].metrics["K"] == 12  # each label's own budget
    assert together[0].state_dict["0.weight"].shape == (12, 16)
    hits = together[0].per_document
    assert sum(hits["tokens"]) == 200 and len(hits["documents"]) == 10
    assert sum(hits["topk_hits"]) / (6 * 200) == together[0].metrics["Recall@K"]

"""TrainStep's warm-up bookkeeping: snapshot/restore puts weights and optimizer state back exactly."""
import torch

from sparse_predictor.trainer import TrainStep, make_predictor


def test_restore_returns_weights_and_adam_state_to_the_snapshot():
    torch.manual_seed(0)
    model = make_predictor(16, 8, 32, seed=1)
    optimizer = torch.optim.AdamW(model.parameters(), 1e-2, weight_decay=0.01)
    step = TrainStep(model, optimizer, None, 0.005, graphs=False, batch_size=4)
    x, y = torch.randn(4, 16), torch.rand(4, 32) > 0.7
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
    model = make_predictor(16, 8, 32, seed=1)
    optimizer = torch.optim.AdamW(model.parameters(), 1e-2)
    step = TrainStep(model, optimizer, None, 0.005, graphs=False, batch_size=4)
    saved = step.snapshot()  # before any step: no optimizer state
    step(torch.randn(4, 16), torch.rand(4, 32) > 0.5)
    step.restore(saved)
    assert all(float(v.abs().sum()) == 0 for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))

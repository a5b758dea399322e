"""make_optimizer: torch's fused AdamW where the weights allow it, with the for-loop's updates."""

import torch

from t2tune.config import TrainConfig
from t2tune.training import make_optimizer


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 4))


def _train(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    data = torch.Generator().manual_seed(1)
    for _ in range(5):
        x = torch.randn(8, 16, generator=data)
        model(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def test_fused_adamw_follows_the_for_loop_within_rounding():
    cfg = TrainConfig(lr=1e-2, weight_decay=0.1)
    fused_model, loop_model = _model(), _model()
    fused = make_optimizer(fused_model, cfg)
    assert fused.defaults["fused"] is True
    assert [g["weight_decay"] for g in fused.param_groups] == [0.1, 0.0]  # no decay on norms and biases
    loop = torch.optim.AdamW(
        [
            {"params": [p for p in loop_model.parameters() if p.ndim >= 2], "weight_decay": 0.1},
            {"params": [p for p in loop_model.parameters() if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=1e-2,
    )
    _train(fused_model, fused)
    _train(loop_model, loop)
    moved = max((a - b).abs().max().item() for a, b in zip(fused_model.parameters(), _model().parameters()))
    assert moved > 1e-2
    for a, b in zip(fused_model.parameters(), loop_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_weight_on_another_device_keeps_the_for_loop():
    model = _model().to(torch.float64)
    assert make_optimizer(model, TrainConfig()).defaults["fused"] is True  # float64 on the CPU is fused too
    meta = torch.nn.Linear(2, 2, device="meta")
    assert not make_optimizer(meta, TrainConfig()).defaults["fused"]

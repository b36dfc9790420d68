"""Optimisers and lr schedules of fine-tuning: each epoch's lr and each step against a hand computation."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from medkd.config import DistillConfig
from medkd.distill import distill
from medkd.train import LoopState

LR = 1e-3


def epoch_lrs(loop: LoopState) -> list[float]:
    """The lr of every epoch, read and stepped as the training loop does (once per epoch)."""
    lrs = []
    for _ in range(loop.epochs):
        lrs.append(loop.optimizer.param_groups[0]["lr"])
        loop.optimizer.step()  # no gradients: a no-op that keeps the scheduler's order check quiet
        loop.scheduler.step()
    return lrs


def test_default_is_adam_and_multistep_as_before():
    model = nn.Linear(2, 2)
    loop = LoopState.create(model, LR, 4, None, seed=0)
    assert type(loop.optimizer) is torch.optim.Adam and loop.optimizer.param_groups[0]["weight_decay"] == 0
    assert type(loop.scheduler) is torch.optim.lr_scheduler.MultiStepLR
    # What LoopState.create built before optimisers and schedules were options: the same state exactly.
    old_optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    old_scheduler = torch.optim.lr_scheduler.MultiStepLR(old_optimizer, (2, 3), gamma=0.1)
    assert loop.optimizer.state_dict() == old_optimizer.state_dict()
    assert loop.scheduler.state_dict() == old_scheduler.state_dict()
    assert epoch_lrs(loop) == [LR, LR, LR * 0.1, LR * 0.1 * 0.1]  # ×0.1 at epochs 2 and 3 (of 4), chained


@pytest.mark.parametrize(
    "schedule,warmup,epochs,milestones,factors",
    [
        # Warm-up 2 of 5: 1/100, then halfway to 1; cosine over the last 3 epochs: 1, cos²(π/6), cos²(π/3).
        ("cosine", 2, 5, None, [0.01, 0.505, 1.0, 0.75, 0.25]),
        (
            "cosine",
            0,
            4,
            None,
            [1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5, (1 + math.cos(3 * math.pi / 4)) / 2],
        ),
        ("cosine", 1, 2, None, [0.01, 1.0]),
        # Milestones stay absolute epochs under a warm-up: ×0.1 after epochs 2 and 3.
        ("multistep", 1, 4, (2, 3), [0.01, 1.0, 0.1, 0.01]),
        (
            "multistep",
            3,
            4,
            None,
            [0.01, 0.34, 0.67, 0.01],
        ),  # default milestones 2, 3: both crossed by epoch 4
    ],
)
def test_lr_per_epoch_equals_a_hand_computation(schedule, warmup, epochs, milestones, factors):
    loop = LoopState.create(
        nn.Linear(2, 2), LR, epochs, milestones, seed=0, schedule=schedule, warmup_epochs=warmup
    )
    assert epoch_lrs(loop) == pytest.approx([LR * f for f in factors], rel=1e-12, abs=0)


def one_weight(value: float = 1.0) -> nn.Linear:
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(value)
    return model


def step(loop: LoopState, model: nn.Linear, grad: float) -> float:
    model.weight.grad = torch.full_like(model.weight, grad)
    loop.optimizer.step()
    return model.weight.item()


def test_adam_decays_through_the_gradient_and_adamw_decoupled():
    # A zero loss gradient: Adam's L2 term becomes the whole gradient, and its normalised step is ~lr;
    # AdamW only shrinks the weight by lr·wd and takes a zero Adam step.
    adam_model, adamw_model = one_weight(), one_weight()
    adam = LoopState.create(adam_model, 0.01, 2, None, 0, optimizer="adam", weight_decay=0.1)
    adamw = LoopState.create(adamw_model, 0.01, 2, None, 0, optimizer="adamw", weight_decay=0.1)
    assert type(adamw.optimizer) is torch.optim.AdamW
    assert step(adam, adam_model, 0.0) == pytest.approx(1.0 - 0.01, rel=1e-6)
    assert step(adamw, adamw_model, 0.0) == pytest.approx(1.0 - 0.01 * 0.1, rel=1e-7)


def test_sgd_is_nesterov_with_momentum_0_9():
    model = one_weight()
    loop = LoopState.create(model, 0.01, 2, None, 0, optimizer="sgd", weight_decay=0.5)
    group = loop.optimizer.param_groups[0]
    assert type(loop.optimizer) is torch.optim.SGD and group["momentum"] == 0.9 and group["nesterov"]
    # Gradient g = 2 + wd·w. Step 1: buf = g, update g + 0.9·buf. Step 2: buf = 0.9·buf + g, likewise.
    g1 = 2 + 0.5 * 1.0
    w1 = 1.0 - 0.01 * (g1 + 0.9 * g1)
    assert step(loop, model, 2.0) == pytest.approx(w1, rel=1e-6)
    g2 = 2 + 0.5 * w1
    buf = 0.9 * g1 + g2
    assert step(loop, model, 2.0) == pytest.approx(w1 - 0.01 * (g2 + 0.9 * buf), rel=1e-6)


def test_a_run_records_its_optimizer_and_schedule_and_the_lr_it_used(synthetic_root, tmp_path):
    cfg = DistillConfig(
        dataset="breastmnist", alpha=1.0, student="timm:test_resnet", student_size=8, epochs=3,
        optimizer="sgd", weight_decay=1e-4, schedule="cosine", warmup_epochs=1, lr=0.01,
        data_dir=str(synthetic_root), out=str(tmp_path / "run"), device="cpu", quiet=True,
    )  # fmt: skip
    distill(cfg)
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    config = result["config"]
    assert config["student"] == "timm:test_resnet"
    recorded = {k: config[k] for k in ("optimizer", "weight_decay", "schedule", "warmup_epochs")}
    assert recorded == {"optimizer": "sgd", "weight_decay": 1e-4, "schedule": "cosine", "warmup_epochs": 1}
    # Epoch 1 warms up at lr/100, then cosine over epochs 2-3: 1, then cos²(π/4) = 1/2.
    assert [h["lr"] for h in result["history"]] == pytest.approx([0.01 * 0.01, 0.01, 0.005], rel=1e-12)

"""model_mode: the mode and requires_grad of every submodule and parameter come back as they were."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from components.modes import model_mode


def _net() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))


def test_eval_and_freeze_are_undone_per_module() -> None:
    net = _net().train()
    net[1].eval()  # a part held in its own mode must keep it
    net[0].bias.requires_grad_(False)  # an already-frozen parameter must stay frozen
    with model_mode(net, train=False, freeze=True):
        assert not any(m.training for m in net.modules())
        assert not any(p.requires_grad for p in net[0].parameters())
    assert net.training and net[0].training and not net[1].training
    assert net[0].weight.requires_grad and not net[0].bias.requires_grad


def test_train_mode_without_freeze_and_restore_after_an_error() -> None:
    a, b = _net().eval(), _net().eval()
    with pytest.raises(RuntimeError), model_mode([a, b, a], train=True):
        assert all(m.training for m in (*a.modules(), *b.modules()))
        assert all(p.requires_grad for p in a[0].parameters())
        raise RuntimeError("boom")
    assert not any(m.training for m in (*a.modules(), *b.modules()))


def test_frozen_parameters_get_no_weight_gradient() -> None:
    net = nn.Linear(3, 2)
    x = torch.randn(4, 3, requires_grad=True)
    with model_mode(net, train=False, freeze=True):
        net(x).sum().backward()
    assert net.weight.grad is None and x.grad is not None
    assert net.weight.requires_grad


def test_train_none_freezes_without_touching_any_mode():
    net = _net().train()
    net[1].eval()
    with model_mode(net, train=None, freeze=True):
        assert net.training and net[0].training and not net[1].training
        assert not any(p.requires_grad for p in net.parameters())
    assert net.training and not net[1].training
    assert all(p.requires_grad for p in net.parameters())

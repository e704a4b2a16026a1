"""The decay rule and the optimizers built from it (minGPT's asserts, as tests)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from unet_pl import UNet
from unet_pl.optim import KerasAdam, build_optimizer, l2_penalty, param_groups


def ids(params) -> set[int]:
    return {id(p) for p in params}


def test_groups_are_disjoint_and_cover_every_trainable_parameter():
    net = UNet()
    decay, other = param_groups(net, weight_decay=0.01)
    assert not ids(decay["params"]) & ids(other["params"])
    assert ids(decay["params"]) | ids(other["params"]) == ids(net.parameters())
    assert len(decay["params"]) + len(other["params"]) == len(list(net.parameters())) == 46


def test_exactly_the_19_conv_and_4_transposed_conv_kernels_decay():
    net = UNet()
    decay, other = param_groups(net, weight_decay=0.01)
    convs = [m for m in net.modules() if type(m) is nn.Conv2d]
    ups = [m for m in net.modules() if type(m) is nn.ConvTranspose2d]
    assert (len(convs), len(ups)) == (19, 4)
    assert ids(decay["params"]) == ids(m.weight for m in convs + ups)
    assert ids(other["params"]) == ids(m.bias for m in convs + ups)  # no bias decays
    assert all(p.ndim == 4 for p in decay["params"]) and all(p.ndim == 1 for p in other["params"])
    assert (decay["weight_decay"], other["weight_decay"]) == (0.01, 0.0)


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_weight_decay_is_twice_the_keras_coefficient(name):
    opt = build_optimizer(UNet(), name, l2=1e-4)
    assert [g["weight_decay"] for g in opt.param_groups] == [2e-4, 0.0]
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == 485_817


def test_adam_and_adamw_keep_keras_defaults():
    for name, cls in (("adam", KerasAdam), ("adamw", torch.optim.AdamW)):
        opt = build_optimizer(UNet(), name)
        assert type(opt) is cls
        g = opt.param_groups[0]
        assert (g["lr"], g["betas"], g.get("keras_eps", g["eps"])) == (1e-3, (0.9, 0.999), 1e-7)
    assert build_optimizer(UNet(), "sgd").param_groups[0]["momentum"] == 0.9


def test_an_extra_non_conv_parameter_goes_to_no_decay():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.unet = UNet()
            self.temperature = nn.Parameter(torch.ones(1))
            self.frozen = nn.Parameter(torch.ones(1), requires_grad=False)

    model = Scaled()
    decay, other = param_groups(model, weight_decay=0.1)
    assert id(model.temperature) in ids(other["params"]) and len(decay["params"]) == 23
    assert id(model.frozen) not in ids(decay["params"]) | ids(other["params"])  # not trainable: in neither


def test_a_kernel_shared_with_a_non_conv_module_is_refused():
    """A conv kernel also registered as a plain parameter elsewhere would land in both groups."""

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.unet = UNet()
            self.tied = self.unet.head.weight

    with pytest.raises(RuntimeError, match="both the decay and the no-decay group"):
        param_groups(Tied(), weight_decay=0.1)


def test_a_parameter_in_neither_group_is_refused(monkeypatch):
    """The cover check: a parameter ``modules()`` never yields (here: hidden) is caught."""
    net = UNet()
    real_modules = nn.Module.modules

    def modules_without_head(self):
        return (m for m in real_modules(self) if m is not net.head)

    monkeypatch.setattr(nn.Module, "modules", modules_without_head)
    with pytest.raises(RuntimeError, match="neither the decay nor the no-decay group"):
        param_groups(net, weight_decay=0.1)


def test_unknown_optimizer_and_negative_l2_are_refused():
    with pytest.raises(ValueError, match="unknown optimizer 'rmsprop'; choose one of adam, adamw, sgd"):
        build_optimizer(UNet(), "rmsprop")
    with pytest.raises(ValueError, match="l2 must be >= 0"):
        build_optimizer(UNet(), "adam", l2=-1.0)


def test_l2_penalty_is_keras_sum_over_kernels_only():
    net = nn.Sequential(nn.Conv2d(1, 1, 1), nn.ConvTranspose2d(1, 1, 2), nn.Linear(1, 1))
    with torch.no_grad():
        net[0].weight.fill_(2.0)  # 1 element: 4
        net[1].weight.fill_(3.0)  # 4 elements: 36
        net[0].bias.fill_(100.0)  # biases and non-conv layers do not count
        net[2].weight.fill_(100.0)
    assert l2_penalty(net, 0.5).item() == pytest.approx(0.5 * (4 + 36))


def test_keras_adam_matches_keras_update_rule_by_hand():
    """W -= lr*sqrt(1-b2^t)/(1-b1^t) * m / (sqrt(v) + eps), Keras' form, on one scalar."""
    eps, lr, b1, b2 = 1e-3, 0.1, 0.9, 0.999  # a large eps, so that where it enters shows
    p = nn.Parameter(torch.tensor([1.0]))
    opt = KerasAdam([p], lr=lr, betas=(b1, b2), eps=eps)
    w, m, v = 1.0, 0.0, 0.0
    for t, g in enumerate([0.5, -0.2, 0.01], start=1):
        p.grad = torch.tensor([g])
        opt.step()
        m, v = m + (g - m) * (1 - b1), v + (g * g - v) * (1 - b2)
        w -= lr * math.sqrt(1 - b2**t) / (1 - b1**t) * m / (math.sqrt(v) + eps)
        assert p.item() == pytest.approx(w, rel=1e-6)
    state = opt.state_dict()
    assert state["param_groups"][0]["keras_step"] == 3 and state["param_groups"][0]["keras_eps"] == eps

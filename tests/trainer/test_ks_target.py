"""The kernel-supervision target switch (pretrain.ks_target) and the decorrelation term: which
parameters each form trains, and the values they compute."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trainer.criterion.prompts import KernelSupervision


def _step(sup: KernelSupervision):
    """One loss and backward on two matched pairs; returns (losses, kernel gradient)."""
    torch.manual_seed(0)
    kernels = torch.randn(1, 3, 4, requires_grad=True)
    seeds = [F.normalize(torch.randn(2, 8), dim=1)]
    losses, stats = sup([kernels], [[(torch.tensor([0, 2]), torch.tensor([1, 0]))]], seeds)
    sum(losses.values()).backward()
    return losses, stats, kernels.grad


def _has_grad(module: torch.nn.Module) -> dict[str, bool]:
    return {
        n: p.grad is not None and bool(p.grad.abs().sum() > 0) for n, p in module.named_parameters()
    }


def test_linear_target_trains_the_projection_and_the_kernels():
    sup = KernelSupervision(8, 4)
    _, stats, kernel_grad = _step(sup)
    assert _has_grad(sup) == {"proj.weight": True, "proj.bias": True}
    assert kernel_grad.abs().sum() > 0 and "target_spread" in stats


def test_detached_target_moves_only_the_kernels():
    sup = KernelSupervision(8, 4, target="detached")
    _, _, kernel_grad = _step(sup)
    assert _has_grad(sup) == {"proj.weight": False, "proj.bias": False}
    assert kernel_grad.abs().sum() > 0
    # Same targets as the trainable Linear with the same weights: only the gradient differs.
    linear = KernelSupervision(8, 4)
    linear.load_state_dict(sup.state_dict())
    seeds = torch.randn(5, 8)
    torch.testing.assert_close(sup.targets(seeds), linear.targets(seeds).detach())


def test_frozen_orthogonal_target_has_no_parameter_and_keeps_angles():
    torch.manual_seed(3)
    sup = KernelSupervision(8, 4, target="frozen_orthogonal")
    assert list(sup.parameters()) == []
    assert "basis" in sup.state_dict()  # a buffer: saved with the checkpoint's extras
    basis = sup.basis
    torch.testing.assert_close(basis @ basis.T, torch.eye(4), atol=1e-5, rtol=0)  # orthonormal
    seeds = torch.randn(5, 8)
    torch.testing.assert_close(sup.targets(seeds), seeds @ basis.T)
    _, _, kernel_grad = _step(sup)
    assert kernel_grad.abs().sum() > 0


def test_decorrelation_term_value_and_gradient():
    sup = KernelSupervision(8, 4, decorrelation=0.5)
    losses, _, _ = _step(sup)
    assert "loss_ks_decorrelation" in losses
    torch.manual_seed(0)
    torch.randn(1, 3, 4)  # the same draws as _step
    seeds = F.normalize(torch.randn(2, 8), dim=1)
    t = F.normalize(sup.targets(seeds).detach(), dim=1)
    expected = 0.5 * float((t[0] @ t[1]) ** 2)  # two targets: one pair, counted both ways
    assert losses["loss_ks_decorrelation"].item() == pytest.approx(expected, rel=1e-5)
    assert "loss_ks_decorrelation" not in _step(KernelSupervision(8, 4))[0]


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="ks_target must be one of"):
        KernelSupervision(8, 4, target="orthogonal")
    with pytest.raises(ValueError, match="ks_decorrelation"):
        KernelSupervision(8, 4, target="frozen_orthogonal", decorrelation=0.1)
    with pytest.raises(ValueError, match="ks_decorrelation"):
        KernelSupervision(8, 4, decorrelation=-1.0)

"""Parity with a real `torch.nn.BatchNorm2d` where PyTorch is installed (skipped otherwise).

The layer imported through `from_torch_state_dict` and trained on the same batches must track PyTorch's
running statistics and counter, and give the same outputs and gradients, in float64.
"""

from __future__ import annotations

import numpy as np
import pytest

from bn_export.conventions import from_torch_state_dict, to_torch_state_dict

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("torch_momentum", [0.1, 0.3, None])
def test_training_matches_torch_batchnorm2d_statistics_outputs_and_gradients(
    torch_momentum: float | None,
) -> None:
    rng = np.random.default_rng(0)
    module = torch.nn.BatchNorm2d(3, momentum=torch_momentum, eps=1e-3).double()
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(rng.uniform(0.5, 2.0, 3)))
        module.bias.copy_(torch.from_numpy(rng.normal(size=3)))
    state = {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}
    layer = from_torch_state_dict(state, momentum=torch_momentum, eps=1e-3, axis=1)
    assert layer.gamma.dtype == np.float64
    assert layer.unbiased_moving_var

    module.train()
    for step in range(4):
        x = rng.normal(2.0 + step, 3.0, size=(5, 3, 4, 6))
        grad_out = rng.normal(size=x.shape)
        tx = torch.from_numpy(x).requires_grad_(True)
        ty = module(tx)
        ty.backward(torch.from_numpy(grad_out))
        y = layer.forward(x, training=True)
        grad_x = layer.backward(grad_out)
        np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(grad_x, tx.grad.numpy(), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(layer.grad_gamma, module.weight.grad.numpy(), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(layer.grad_beta, module.bias.grad.numpy(), rtol=1e-10, atol=1e-12)
        module.zero_grad()

    exported = to_torch_state_dict(layer)
    ours = module.state_dict()
    np.testing.assert_allclose(exported["running_mean"], ours["running_mean"].numpy(), rtol=1e-12)
    np.testing.assert_allclose(exported["running_var"], ours["running_var"].numpy(), rtol=1e-12)
    assert int(exported["num_batches_tracked"]) == int(ours["num_batches_tracked"])

    module.eval()
    x = rng.normal(size=(7, 3, 2, 2))
    np.testing.assert_allclose(
        layer.forward(x, training=False), module(torch.from_numpy(x)).detach().numpy(), rtol=1e-12, atol=1e-12
    )

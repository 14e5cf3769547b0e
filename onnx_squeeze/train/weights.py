"""Seeded parameter filling and placement of exact zeros in torch models, for tests and experiments."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


@torch.no_grad()
def fill_seeded(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fill every parameter and BatchNorm running statistic of ``model`` from a seeded generator.

    Weights of rank 2 and more get ``N(0, 1 / fan_in)`` with ``fan_in = numel / shape[0]``, so
    activations keep a scale near 1 through deep models. Other parameters (biases, layer
    scales) get ``U(-0.5, 0.5)``. Norm layers get weight ``U(0.5, 1.5)`` and bias
    ``U(-0.5, 0.5)``; BatchNorm gets running mean ``N(0, 0.1^2)`` and running variance
    ``U(0.5, 1.5)``. No value is exactly zero except by chance. Returns ``model.eval()``.
    """
    generator = torch.Generator().manual_seed(seed)

    def uniform(tensor: torch.Tensor, low: float, high: float) -> None:
        tensor.copy_(low + (high - low) * torch.rand(tensor.shape, generator=generator))

    norm_parameters = set()
    for module in model.modules():
        if not isinstance(module, NORM_TYPES):
            continue
        if getattr(module, "weight", None) is not None:
            uniform(module.weight, 0.5, 1.5)
            norm_parameters.add(id(module.weight))
        if getattr(module, "bias", None) is not None:
            uniform(module.bias, -0.5, 0.5)
            norm_parameters.add(id(module.bias))
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
            module.running_mean.copy_(0.1 * torch.randn(module.running_mean.shape, generator=generator))
            uniform(module.running_var, 0.5, 1.5)

    for parameter in model.parameters():
        if id(parameter) in norm_parameters:
            continue
        if parameter.dim() >= 2:
            fan_in = parameter.numel() // parameter.shape[0]
            parameter.copy_(torch.randn(parameter.shape, generator=generator) / fan_in**0.5)
        else:
            uniform(parameter, -0.5, 0.5)
    return model.eval()


@torch.no_grad()
def zero_output_units(layer: nn.Module, units: Sequence[int], bias: float | Sequence[float] | None = 0.0) -> None:
    """Zero the weights that write output ``units`` of a Conv or Linear layer and set their bias.

    Output units are axis 0 of the weight for both layer types. ``bias`` is one value for all
    units or one per unit, and None leaves the bias as it is.
    """
    units = list(units)
    layer.weight[units] = 0.0
    if bias is not None and layer.bias is not None:
        layer.bias[units] = torch.as_tensor(bias, dtype=layer.bias.dtype)


@torch.no_grad()
def zero_input_units(layer: nn.Module, units: Sequence[int]) -> None:
    """Zero the weights that read input ``units`` of a Linear or an ungrouped Conv layer."""
    if getattr(layer, "groups", 1) != 1:
        raise ValueError(f"{layer}: input units of a grouped conv are not one weight axis. Zero its output units instead")
    layer.weight[:, list(units)] = 0.0


@torch.no_grad()
def set_batchnorm_channel(
    bn: nn.modules.batchnorm._BatchNorm, channel: int, *, weight: float, bias: float, mean: float, var: float
) -> None:
    """Set gamma, beta and the running statistics of one BatchNorm channel."""
    bn.weight[channel] = weight
    bn.bias[channel] = bias
    bn.running_mean[channel] = mean
    bn.running_var[channel] = var

"""Float64 formulas the kernels are checked against, and a relative-error helper."""

import torch

# Relative-norm tolerances by input dtype (outputs are rounded to the input dtype).
TOLERANCE = {torch.float32: 5e-5, torch.bfloat16: 2e-2, torch.float16: 1e-2}


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.detach().double().cpu()
    diff = (actual.detach().double().cpu() - expected).norm()
    return float(diff / expected.norm().clamp_min(1e-30))


def masked_lora_f64(x, weight, bias, lora_a, lora_b, scaling, out_index=None, in_index=None, **_plan):
    """The contract, literally, in float64 and differentiable: dense base plus the masked rank-r term.

    `_plan` (precomputed positions, `checked`) changes how the op runs, not what it computes.
    """
    x, weight, lora_a, lora_b = (t.double() for t in (x, weight, lora_a, lora_b))
    y = x @ weight.t()
    if bias is not None:
        y = y + bias.double()
    x_sel = x if in_index is None else x[..., in_index]
    delta = scaling * (x_sel @ lora_a.t()) @ lora_b.t()
    if out_index is None:
        return y + delta
    full = torch.zeros_like(y)
    full[..., out_index] = delta
    return y + full


def neuron_stats_f64(acts, grads, token_mask=None):
    """(fisher, saliency, tokens) in float64 by boolean selection."""
    hidden = acts.shape[-1]
    a = acts.double().reshape(-1, hidden)
    g = grads.double().reshape(-1, hidden)
    if token_mask is not None:
        keep = torch.broadcast_to(token_mask, acts.shape[:-1]).reshape(-1) != 0
        a, g = a[keep], g[keep]
    return (g * g).sum(0), (a * g).abs().sum(0), a.shape[0]

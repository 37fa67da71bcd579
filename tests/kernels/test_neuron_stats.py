"""neuron_stats: both backends against float64 sums; masks, dtypes, streaming, determinism, errors."""

import pytest
import torch
from kernel_formulas import neuron_stats_f64, rel_err

from agml_kernels import NeuronStats, neuron_stats

BATCH, TOKENS, HIDDEN = 3, 37, 70  # neither a multiple of any block size
STATS_TOLERANCE = 1e-5  # float32 accumulation of exactly representable products, whatever the input dtype


def acts_grads(device, dtype=torch.float32, shape=(BATCH, TOKENS, HIDDEN), seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen).to(device=device, dtype=dtype) for _ in range(2)]


def assert_matches_f64(stats, acts, grads, token_mask=None):
    fisher, saliency, tokens = neuron_stats_f64(acts, grads, token_mask)
    assert stats.fisher.dtype == torch.float32 and stats.saliency.dtype == torch.float32
    assert stats.tokens == tokens
    assert rel_err(stats.fisher, fisher) < STATS_TOLERANCE
    assert rel_err(stats.saliency, saliency) < STATS_TOLERANCE


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_float64(kernel_backend, device, dtype):
    acts, grads = acts_grads(device, dtype)
    assert_matches_f64(neuron_stats(acts, grads), acts, grads)


MASKS = {
    "bool": lambda g: torch.rand(BATCH, TOKENS, generator=g) > 0.4,
    "int-0-1": lambda g: (torch.rand(BATCH, TOKENS, generator=g) > 0.4).long(),
    "float-0-1": lambda g: (torch.rand(BATCH, TOKENS, generator=g) > 0.4).float(),
    "broadcast-tokens": lambda g: torch.rand(TOKENS, generator=g) > 0.4,
    "broadcast-batch": lambda g: torch.rand(BATCH, 1, generator=g) > 0.4,
    "all-ones": lambda g: torch.ones(BATCH, TOKENS, dtype=torch.bool),
    "all-zeros": lambda g: torch.zeros(BATCH, TOKENS, dtype=torch.bool),
}


@pytest.mark.parametrize("kind", list(MASKS))
def test_token_mask(kernel_backend, device, kind):
    acts, grads = acts_grads(device)
    mask = MASKS[kind](torch.Generator().manual_seed(2)).to(device)
    assert_matches_f64(neuron_stats(acts, grads, mask), acts, grads, mask)


@pytest.mark.parametrize("shape", [(HIDDEN,), (0, HIDDEN), (TOKENS, 1), (2, 2, 5, HIDDEN)], ids=str)
def test_shapes(kernel_backend, device, shape):
    acts, grads = acts_grads(device, shape=shape)
    stats = neuron_stats(acts, grads)
    assert stats.fisher.shape == (shape[-1],)
    if acts.numel():
        assert_matches_f64(stats, acts, grads)
    else:
        assert stats.tokens == 0 and not stats.fisher.any() and not stats.saliency.any()


def test_non_contiguous_inputs(kernel_backend, device):
    acts, grads = acts_grads(device, shape=(TOKENS, 2 * HIDDEN))
    acts, grads = acts[:, ::2], grads.t().contiguous().t()[:, :HIDDEN]
    assert not acts.is_contiguous() and not grads.is_contiguous()
    assert_matches_f64(neuron_stats(acts, grads), acts, grads)


def test_streaming_sum_equals_one_call(kernel_backend, device):
    acts, grads = acts_grads(device)
    mask = MASKS["bool"](torch.Generator().manual_seed(3)).to(device)
    whole = neuron_stats(acts, grads, mask)
    streamed = NeuronStats.zeros(HIDDEN, device=device)
    for b in range(BATCH):
        streamed = streamed + neuron_stats(acts[b], grads[b], mask[b])
    assert streamed.tokens == whole.tokens
    torch.testing.assert_close(streamed.fisher, whole.fisher, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(streamed.saliency, whole.saliency, rtol=1e-6, atol=1e-6)


def test_triton_is_deterministic(triton_backend, device):
    acts, grads = acts_grads(device, dtype=torch.bfloat16)
    first, second = neuron_stats(acts, grads), neuron_stats(acts, grads)
    assert torch.equal(first.fisher, second.fisher) and torch.equal(first.saliency, second.saliency)


@pytest.mark.parametrize(
    "make_bad, message",
    [
        (lambda a, g: (a, g[..., :-1], None), "same shape"),
        (lambda a, g: (a.long(), g.long(), None), "floating point"),
        (lambda a, g: (a.tolist(), g, None), "torch.Tensors"),
        (lambda a, g: (a, g, torch.ones(TOKENS + 1, dtype=torch.bool)), "token_mask"),
        (lambda a, g: (a, g, torch.full((BATCH, TOKENS), 2)), "token_mask"),
        (lambda a, g: (a, g, [1, 0]), "token_mask"),
        (lambda a, g: (a[0, 0, 0], g[0, 0, 0], None), "at least one dimension"),
    ],
    ids=["shape", "dtype", "not-tensor", "mask-broadcast", "mask-values", "mask-type", "scalar"],
)
def test_bad_arguments_raise_value_error(make_bad, message):
    acts, grads = acts_grads("cpu")
    with pytest.raises(ValueError, match=message):
        neuron_stats(*make_bad(acts, grads))


def test_adding_mismatched_stats_raises():
    with pytest.raises(ValueError, match="cannot add"):
        NeuronStats.zeros(3) + NeuronStats.zeros(4)

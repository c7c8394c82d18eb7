"""Observers (minmax, percentile, mse, moving average) and weight_qparams."""
import pytest
import torch

import kquant
from kquant.calibration import (GRANULARITIES, OBSERVERS, fake_quant_error, make_observer, mse_search,
                                weight_qparams)
from kquant.format import PER_CHANNEL, padded_k, quantize_weight


def expected_shape(granularity, x, group_size, ch_axis=0):
    if granularity == "per_tensor":
        return ()
    if granularity == "per_channel":
        return (x.shape[ch_axis],)
    if granularity == "per_token":
        return tuple(x.shape[:-1]) + (1,)
    return tuple(x.shape[:-1]) + (-(-x.shape[-1] // group_size),)


@pytest.mark.parametrize("name", OBSERVERS)
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_observer_shapes_and_scales(name, granularity):
    x = torch.randn(3, 5, 40)
    obs = make_observer(name, granularity, group_size=16)
    assert not obs.has_data()
    obs.observe(x)
    obs.observe(x * 0.5)
    assert obs.has_data()
    lo, hi = obs.range()
    want = expected_shape(granularity, x, 16)
    assert tuple(lo.shape) == want and tuple(hi.shape) == want
    # (per_group pads the last group with zeros, so its range always contains 0)
    assert (lo <= hi).all() and (lo <= 0).all() and (hi >= 0).all() and (hi > lo).all()
    for bits, sym in ((8, True), (4, True), (8, False), (4, False)):
        scale, zero = obs.qparams(bits, sym)
        assert tuple(scale.shape) == want
        assert torch.isfinite(scale).all() and (scale > 0).all()
        if sym:
            assert zero is None
        else:
            assert tuple(zero.shape) == want and (zero == zero.round()).all()


@pytest.mark.parametrize("name", OBSERVERS)
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_zero_tensor_gives_safe_scales(name, granularity):
    obs = make_observer(name, granularity, group_size=32)
    obs.observe(torch.zeros(4, 70))
    for sym in (True, False):
        scale, zero = obs.qparams(8, sym)
        assert torch.isfinite(scale).all() and (scale > 0).all()
        if zero is not None:
            assert torch.isfinite(zero).all()


def test_minmax_values_per_granularity():
    x = torch.randn(6, 64)
    obs = make_observer("minmax", "per_tensor")
    obs.observe(x[:3])
    obs.observe(x[3:])
    lo, hi = obs.range()
    assert lo == x.min() and hi == x.max()
    scale, _ = obs.qparams(8, True)
    assert torch.allclose(scale, x.abs().max() / 127)

    pc = make_observer("minmax", "per_channel", ch_axis=-1)
    pc.observe(x[:2])
    pc.observe(x[2:])
    assert torch.equal(pc.range()[1], x.amax(dim=0))

    pg = make_observer("minmax", "per_group", group_size=16)
    pg.observe(x)
    assert torch.equal(pg.range()[0], x.reshape(6, 4, 16).amin(dim=-1))

    pt = make_observer("minmax", "per_token")
    pt.observe(x)
    pt.observe(x[:2] * 3)  # per_token keeps only the last batch's rows
    assert torch.equal(pt.range()[1], (x[:2] * 3).amax(dim=-1, keepdim=True))


def test_per_channel_count_change_is_refused():
    obs = make_observer("minmax", "per_channel")
    obs.observe(torch.randn(4, 8))
    with pytest.raises(ValueError, match="slices"):
        obs.observe(torch.randn(5, 8))


def test_bad_input():
    with pytest.raises(ValueError, match="unknown observer"):
        make_observer("histogram")
    with pytest.raises(ValueError, match="granularity"):
        make_observer("minmax", "per_row")
    obs = make_observer("minmax")
    with pytest.raises(ValueError, match="no data"):
        obs.range()
    with pytest.raises(TypeError, match="floating-point"):
        obs.observe(torch.ones(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="NaN or Inf"):
        obs.observe(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="NaN or Inf"):
        obs.observe(torch.tensor([1.0, float("inf")]))


def test_percentile_clips_outliers():
    x = torch.randn(100_000)
    x[:5] = 1000.0
    obs = make_observer("percentile", percentile=99.9)
    obs.observe(x)
    lo, hi = obs.range()
    assert 2.0 < hi < 5.0 and -5.0 < lo < -2.0
    # the reference: exact quantiles of the same data
    assert torch.allclose(hi, torch.quantile(x, 0.999), rtol=0.05)


def test_percentile_large_tensor_uses_sample():
    # beyond torch.quantile's input limit (16M elements)
    x = torch.randn(20_000_000)
    obs = make_observer("percentile", percentile=99.0)
    obs.observe(x)
    lo, hi = obs.range()
    assert abs(hi.item() - 2.326) < 0.05 and abs(lo.item() + 2.326) < 0.05


@pytest.mark.parametrize("order", ["small_first", "large_first"])
def test_sample_is_uniform_across_batches(order):
    # each observed value must be equally likely to be kept, whatever the batch sizes:
    # 1,000 zeros and 100,000 ones -> about 1% zeros in a 4,096-value sample
    obs = make_observer("percentile", percentile=60.0, max_samples=4096)
    batches = [torch.zeros(1000), torch.ones(100_000)]
    for b in (batches if order == "small_first" else batches[::-1]):
        obs.observe(b)
    frac = (obs.sample == 0).float().mean().item()
    assert obs.sample.numel() == 4096
    assert 0.003 < frac < 0.02  # expected 0.0099, sd 0.0016
    lo, hi = obs.range()
    assert lo.item() == 1.0 and hi.item() == 1.0


def test_sample_is_uniform_for_near_cap_batches():
    obs = make_observer("percentile", max_samples=1000)
    for i in range(10):  # 10 batches of 1,500 values tagged by batch index
        obs.observe(torch.full((1500,), float(i)))
    counts = torch.bincount(obs.sample.flatten().long(), minlength=10)
    assert counts.sum() == 1000 and counts.min() > 50 and counts.max() < 150  # expected 100 each


def test_mse_observer_never_worse_than_minmax():
    x = torch.randn(50_000)
    x[:3] = 40.0  # outliers: clipping helps a lot
    for bits, sym in ((8, True), (4, True), (4, False)):
        mm = make_observer("minmax")
        ms = make_observer("mse", bits=bits, symmetric=sym)
        mm.observe(x)
        ms.observe(x)
        v = x.reshape(1, -1)
        e_mm = fake_quant_error(v, *[t.reshape(1) for t in mm.range()], bits, sym)
        lo, hi = ms.range(bits, sym)
        e_ms = fake_quant_error(v, lo.reshape(1), hi.reshape(1), bits, sym)
        assert e_ms <= e_mm
        assert hi < 40.0  # the outliers were clipped
        s, _ = ms.qparams(bits, sym)
        assert torch.isfinite(s) and s > 0


def test_moving_average_is_an_ema():
    c = 0.25
    obs = make_observer("moving_average", "per_channel", averaging_constant=c)
    batches = [torch.randn(4, 32) * (i + 1) for i in range(5)]
    lo = hi = None
    for b in batches:
        obs.observe(b)
        blo, bhi = b.amin(dim=1), b.amax(dim=1)
        if lo is None:
            lo, hi = blo, bhi
        else:
            lo, hi = (1 - c) * lo + c * blo, (1 - c) * hi + c * bhi
    olo, ohi = obs.range()
    assert torch.allclose(olo, lo, rtol=1e-6, atol=1e-6) and torch.allclose(ohi, hi, rtol=1e-6, atol=1e-6)
    # and it lags behind a plain running max
    mm = make_observer("minmax", "per_channel")
    for b in batches:
        mm.observe(b)
    assert (ohi < mm.range()[1]).all()


def test_observer_bf16_input():
    x = torch.randn(8, 64, dtype=torch.bfloat16)
    obs = make_observer("minmax", "per_token")
    obs.observe(x)
    assert obs.range()[1].dtype == torch.float32
    assert torch.equal(obs.range()[1], x.float().amax(dim=-1, keepdim=True))


# ----------------------------------------------------------------------------- weights
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group_size", [32, 64, 128, PER_CHANNEL])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("k", [100, 129, 17])
def test_weight_qparams_shapes_and_mse(bits, group_size, symmetric, k):
    n = 24
    w = torch.randn(n, k) * torch.rand(n, 1)
    w[0, 3] = 9.0  # an outlier
    kp = padded_k(k, bits, group_size)
    g = 1 if group_size == PER_CHANNEL else kp // group_size
    errs = {}
    for method in ("minmax", "percentile", "mse"):
        scales, zeros = weight_qparams(w, bits, group_size, symmetric, method)
        assert tuple(scales.shape) == (n, g) and scales.dtype == torch.float32
        assert torch.isfinite(scales).all() and (scales > 0).all()
        if symmetric:
            assert zeros is None
        else:
            assert tuple(zeros.shape) == (n, g)
        p = quantize_weight(w, bits, group_size, symmetric, scales, zeros).validate()
        errs[method] = ((p.dequantize() - w) ** 2).sum().item()
    # minmax qparams are exactly what quantize_weight does by default
    ref = quantize_weight(w, bits, group_size, symmetric)
    assert errs["minmax"] == ((ref.dequantize() - w) ** 2).sum().item()
    assert errs["mse"] <= errs["minmax"]


def test_weight_mse_helps_4bit_with_outliers():
    w = torch.randn(64, 256)
    w[:, ::37] *= 8.0
    s_mm, _ = weight_qparams(w, 4, PER_CHANNEL, True, "minmax")
    s_ms, _ = weight_qparams(w, 4, PER_CHANNEL, True, "mse")
    e = {}
    for m, s in (("mm", s_mm), ("ms", s_ms)):
        e[m] = ((quantize_weight(w, 4, PER_CHANNEL, True, s).dequantize() - w) ** 2).sum().item()
    assert e["ms"] < 0.9 * e["mm"]
    assert (s_ms <= s_mm).all()


def test_weight_qparams_zero_rows_and_bad_input():
    w = torch.zeros(4, 64)
    w[1] = torch.randn(64)
    for method in ("minmax", "percentile", "mse"):
        s, z = weight_qparams(w, 4, 32, False, method)
        assert torch.isfinite(s).all() and (s > 0).all() and torch.isfinite(z).all()
        p = quantize_weight(w, 4, 32, False, s, z)
        assert torch.equal(p.dequantize()[0], torch.zeros(64))
    with pytest.raises(ValueError, match="method"):
        weight_qparams(w, 8, PER_CHANNEL, True, "moving_average")
    with pytest.raises(ValueError, match="group size"):
        weight_qparams(w, 8, 48, True, "minmax")
    with pytest.raises(ValueError, match="bits"):
        weight_qparams(w, 5, PER_CHANNEL, True, "minmax")
    with pytest.raises(TypeError, match="2-D"):
        weight_qparams(torch.randn(3, 4, 5), 8, PER_CHANNEL, True, "minmax")
    bad = torch.randn(4, 8)
    bad[2, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        weight_qparams(bad, 8, PER_CHANNEL, True, "mse")


def test_mse_search_includes_full_range():
    v = torch.linspace(-1, 1, 255).reshape(1, -1)  # uniform: clipping cannot help at 8 bits
    lo, hi = mse_search(v, v.amin(dim=1), v.amax(dim=1), 8, True)
    assert lo.item() == -1.0 and hi.item() == 1.0


@pytest.mark.parametrize("weight_obs,act_obs", [("mse", "percentile"), ("percentile", "mse"),
                                                 ("minmax", "moving_average")])
def test_quantize_with_observers_end_to_end(weight_obs, act_obs):
    # the core calls weight_qparams / make_observer through QuantConfig
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    x = torch.randn(16, 64)
    ref = model(x)
    cfg = kquant.QuantConfig(weight_bits=4, group_size=32, activations="static", weight_observer=weight_obs,
                             act_observer=act_obs)
    kquant.quantize_(model, cfg, calib_data=[x[:8], x[8:]], progress=False)
    out = model(x)
    assert isinstance(model[0], kquant.QuantLinear) and model[0].act_scale is not None
    assert ((out - ref).norm() / ref.norm()).item() < 0.2

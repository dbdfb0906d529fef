"""Group-wise quantization: round trip against a float reference, layout, byte counts, config."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest
import torch

from flexgen_dist.errors import UserError
from flexgen_dist.planning.compression import CompressionConfig, compressed_nbytes, compressed_row_bytes
from flexgen_dist.storage.quantize import QuantizedTensor, dequantize, empty_quantized, quantize, quantize_into

FP32_EPS = torch.finfo(torch.float32).eps

# (shape, group_dim): multiples of the group size and not, 2-D to 4-D, a non-last group dim.
CASES = [((64, 128), -1), ((5, 70), -1), ((3, 2, 100), -1), ((6, 2, 3, 64), -1), ((4, 70, 3), 1)]


def random_tensor(shape, seed: int, offset: float = 0.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator) * 2.0 + offset


def fp16_spacing_bound(value: torch.Tensor) -> torch.Tensor:
    """An upper bound on the gap between `value` and the float16 values next to it."""
    return value.abs() * 2.0**-10 + 2.0**-24


def assert_within_reference_bound(x: torch.Tensor, y: torch.Tensor, config: CompressionConfig) -> None:
    """|y - x| <= scale / 2 per element, scale from each group's OWN min and max (not the stored one).

    The stored minimum is rounded down to float16 and the scale up, which may widen a group's range
    by one float16 step of its minimum and the scale by one part in 2**10; fp32 arithmetic adds a
    few ulps of the values' magnitude.
    """
    group_dim = config.group_dim % x.dim()
    x_moved = x.double().movedim(group_dim, -1)  # (rows, *other, dim)
    y_moved = y.double().movedim(group_dim, -1)
    for group_start in range(0, x_moved.shape[-1], config.group_size):
        group = x_moved[..., group_start : group_start + config.group_size]  # real values only
        group_min = group.amin(-1, keepdim=True)
        group_max = group.amax(-1, keepdim=True)
        widened = group_max - group_min + fp16_spacing_bound(group_min)
        bound = 0.5 * widened / config.levels * (1 + 2.0**-10)
        bound = bound + 8 * FP32_EPS * torch.maximum(group_min.abs(), group_max.abs())
        error = (y_moved[..., group_start : group_start + config.group_size] - group).abs()
        excess = float((error - bound).max())
        assert excess <= 0, f"group at {group_start}: error {excess} over the bound"


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape, group_dim", CASES)
def test_round_trip_error_is_within_half_a_step_of_each_group(bits, shape, group_dim):
    config = CompressionConfig(bits=bits, group_size=64, group_dim=group_dim)
    # An offset far from 0: padding that leaked into a group's min/max (zeros, say) would widen
    # its scale, and the error of the last, padded group would no longer meet its own bound.
    for x in (random_tensor(shape, seed=1), random_tensor(shape, seed=2, offset=40.0)):
        q = quantize(x, config)
        y = dequantize(q)
        assert y.shape == x.shape and y.dtype == torch.float32
        assert_within_reference_bound(x, y, config)


def test_eight_bits_are_finer_than_four():
    x = random_tensor((16, 256), seed=3)
    errors = {bits: float((dequantize(quantize(x, CompressionConfig(bits=bits))) - x).abs().max()) for bits in (4, 8)}
    # the step shrinks by 255 / 15 = 17x; random data comes close to the worst case in both
    assert errors[8] * 8 < errors[4]


@pytest.mark.parametrize("bits", [4, 8])
def test_constant_groups_have_scale_zero_and_come_back_exactly(bits):
    constants = torch.tensor([0.0, 1.5, -3.0, 1024.0, -0.0078125])  # float16 values
    x = constants[:, None].expand(5, 70).clone()  # 70 columns: a full group and a padded one
    x[4, :64] = random_tensor((64,), seed=4)  # a varying group beside a constant padded one
    q = quantize(x, CompressionConfig(bits=bits))
    y = dequantize(q)
    assert torch.isfinite(y).all()
    assert bool((q.scale[:4] == 0).all()) and bool((q.scale[4, 1] == 0).all())
    assert torch.equal(y[:4], x[:4])
    assert torch.equal(y[4, 64:], x[4, 64:])
    assert_within_reference_bound(x, y, CompressionConfig(bits=bits))


def test_constant_that_is_no_float16_value_stays_within_a_float16_step():
    x = torch.full((3, 64), 0.1)
    y = dequantize(quantize(x, CompressionConfig()))
    assert torch.isfinite(y).all()
    assert float((y - x).abs().max()) <= float(fp16_spacing_bound(torch.tensor(0.1)))


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_into_row_ranges_equals_quantizing_the_whole_tensor_bit_for_bit(bits):
    config = CompressionConfig(bits=bits)
    x = random_tensor((7, 3, 100), seed=5)
    whole = quantize(x, config)
    pieces = empty_quantized(x.shape, config, "cpu", dtype=x.dtype)
    for start, stop in ((4, 7), (0, 3), (3, 4)):  # out of order, one row alone (a decode step)
        quantize_into(pieces, slice(start, stop), x[start:stop])
    for part in ("data", "scale", "mins"):
        assert torch.equal(getattr(pieces, part), getattr(whole, part)), part
    # rows() is a view: dequantizing rows 2..5 gives rows 2..5 of the whole
    view = whole.rows(slice(2, 5))
    assert view.data.data_ptr() == whole.data[2].data_ptr()
    assert torch.equal(dequantize(view), dequantize(whole)[2:5])


@pytest.mark.parametrize(
    "shape, config",
    [
        ((4096, 4096), CompressionConfig()),
        ((5, 70), CompressionConfig()),
        ((3, 2, 100), CompressionConfig(bits=8, group_size=32)),
        ((9, 4, 2, 128), CompressionConfig(group_size=64)),
        ((4, 70, 3), CompressionConfig(group_size=16, group_dim=1)),
        ((2, 10), CompressionConfig(group_size=6)),
    ],
)
def test_storage_bytes_equal_the_planning_count(shape, config):
    q = empty_quantized(shape, config, "cpu")
    assert q.nbytes == compressed_nbytes(shape, config)
    row = compressed_row_bytes(shape, config)
    assert q.rows(slice(0, 1)).nbytes == row.total
    assert (row.data, row.scale, row.mins) == (q.data[0].numel(), q.scale[0].numel() * 2, q.mins[0].numel() * 2)


def test_planning_count_for_a_4096_square_weight_from_first_principles():
    # 4096 rows of 4096 values in 64 groups of 64: 4 bits a value, two fp16 numbers a group
    expected = 4096 * (4096 * 4 // 8 + 64 * 2 * 2)
    assert compressed_nbytes((4096, 4096), CompressionConfig()) == expected


def test_four_bits_pack_two_values_a_byte_first_half_low_nibbles():
    x = random_tensor((3, 100), seed=6)  # padded to 128 values a row
    q4 = quantize(x, CompressionConfig(bits=4))
    q8 = quantize(x, CompressionConfig(bits=8))
    assert q4.data.numel() == 3 * 128 // 2 and q8.data.numel() == 3 * 128
    # byte j holds value j (low nibble) and value j + 64 (high nibble), per the documented layout
    y = dequantize(q4)
    scale, mins = q4.scale.float(), q4.mins.float()
    low = (q4.data & 0x0F).float() * scale[:, :1] + mins[:, :1]  # values 0..63: group 0
    high = (q4.data >> 4).float() * scale[:, 1:] + mins[:, 1:]  # values 64..127: group 1
    assert torch.equal(low, y[:, :64])
    assert torch.equal(high[:, :36], y[:, 64:])


@pytest.mark.parametrize("shape, group_dim", [((64, 128), -1), ((5, 70), -1), ((4, 70, 3), 1)])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dequantize_writes_into_the_given_buffer(shape, group_dim, out_dtype):
    q = quantize(random_tensor(shape, seed=7), CompressionConfig(group_dim=group_dim))
    out = torch.full(shape, float("nan"), dtype=out_dtype)
    pointer = out.data_ptr()
    result = dequantize(q, out=out)
    assert result is out and result.data_ptr() == pointer
    assert torch.equal(out, dequantize(q).to(out_dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sixteen_bit_inputs(dtype):
    config = CompressionConfig()
    x = random_tensor((6, 200), seed=8).to(dtype)
    q = quantize(x, config)
    assert q.dtype == dtype
    assert_within_reference_bound(x.float(), dequantize(q), config)
    assert dequantize(q, dtype=dtype).dtype == dtype


def test_config_refuses_three_bits_saying_why():
    with pytest.raises(UserError) as info:
        CompressionConfig(bits=3)
    message = str(info.value)
    assert "bits=3" in message and "only 4 and 8" in message and "byte" in message and "\n" not in message


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(bits=16), "bits=16"),
        (dict(bits=True), "bits=True"),
        (dict(group_size=0), "group_size=0"),
        (dict(group_size=-64), "group_size=-64"),
        (dict(group_size=63), "must be even"),
        (dict(group_dim=0), "leading dimension"),
        (dict(group_dim=1.0), "group_dim=1.0"),
    ],
)
def test_config_refuses_bad_values_in_one_line(kwargs, words):
    with pytest.raises(UserError) as info:
        CompressionConfig(**kwargs)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_odd_group_size_is_fine_with_eight_bits():
    config = CompressionConfig(bits=8, group_size=7)
    x = random_tensor((3, 20), seed=9)
    assert_within_reference_bound(x, dequantize(quantize(x, config)), config)


def test_group_dim_that_resolves_to_the_leading_dim_or_a_1d_tensor_is_refused():
    with pytest.raises(UserError, match="leading dimension"):
        quantize(torch.ones(4, 64), CompressionConfig(group_dim=-2))
    with pytest.raises(UserError, match="1-D"):
        quantize(torch.ones(64), CompressionConfig())
    with pytest.raises(UserError, match="out of range"):
        quantize(torch.ones(4, 64), CompressionConfig(group_dim=2))


def test_misuse_is_refused():
    config = CompressionConfig()
    q = quantize(random_tensor((4, 64), seed=10), config)
    with pytest.raises(ValueError, match="needs shape"):
        quantize_into(q, slice(0, 2), torch.zeros(3, 64))
    with pytest.raises(ValueError, match="contiguous slice"):
        q.rows(slice(0, 4, 2))
    with pytest.raises(ValueError, match="out must have shape"):
        dequantize(q, out=torch.empty(4, 63))
    with pytest.raises(ValueError, match="QuantizedTensor.scale"):
        QuantizedTensor(q.data, q.scale.float(), q.mins, q.shape, q.dtype, config)


@pytest.mark.parametrize("bits", [4, 8])
def test_values_beyond_float16_range_are_clamped_and_still_fit_float16(bits):
    x = torch.tensor([[1e6, -1e6] + [0.0] * 62, [65504.0, -65504.0] + [1.0] * 62])
    q = quantize(x, CompressionConfig(bits=bits))
    assert torch.isfinite(dequantize(q, dtype=torch.float16)).all()
    y = dequantize(q)
    assert float(y.max()) <= 65504.0 and float(y.min()) >= -65504.0
    assert float(y[0, 0]) > 65000.0 and float(y[0, 1]) < -65000.0  # clamped near the edge, not squashed


def test_planning_module_imports_without_torch():
    # flexgen_dist/__init__ imports torch: give the planning module its package without running it
    root = pathlib.Path(__file__).parents[1] / "flexgen_dist"
    code = "\n".join([
        "import importlib.util, sys, types",
        "sys.modules['torch'] = None  # any import of torch now fails",
        f"root = {str(root)!r}",
        "for name, path in (('flexgen_dist', root), ('flexgen_dist.planning', root + '/planning')):",
        "    package = types.ModuleType(name); package.__path__ = [path]; sys.modules[name] = package",
        "name, path = 'flexgen_dist.planning.compression', root + '/planning/compression.py'",
        "spec = importlib.util.spec_from_file_location(name, path)",
        "module = importlib.util.module_from_spec(spec); sys.modules[name] = module",
        "spec.loader.exec_module(module)",
        "print(module.compressed_nbytes((4, 64), module.CompressionConfig()))",
    ])
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) == compressed_nbytes((4, 64), CompressionConfig())


@pytest.mark.cuda
def test_cuda_quantization_matches_the_cpu_bit_for_bit():
    config = CompressionConfig()
    x = random_tensor((33, 200), seed=11)
    on_cpu = quantize(x, config)
    on_gpu = quantize(x.cuda(), config)
    for part in ("data", "scale", "mins"):
        assert torch.equal(getattr(on_gpu, part).cpu(), getattr(on_cpu, part)), part
    out = torch.empty(x.shape, dtype=torch.float16, device="cuda")
    dequantize(on_gpu, out=out)
    assert torch.equal(out.cpu(), dequantize(on_cpu).half())
    assert on_gpu.nbytes == compressed_nbytes(tuple(x.shape), config)


def test_fitted_weights_never_lose_to_min_max_and_win_on_heavy_tails():
    """Each group's fitted minimum and scale (clipped ranges, a least-squares step) err no more
    than min-max's, group by group; on heavy-tailed weights the squared error falls clearly.
    NaN and constant groups come back as min-max gives them."""
    torch.manual_seed(0)
    config = CompressionConfig(bits=4, group_size=64)
    w = torch.distributions.StudentT(3.0).sample((64, 256))
    w[3, :64] = 0.25  # a constant group
    w[5, 70] = float("nan")
    plain, fitted = quantize(w, config), quantize(w, config, fitted=True)
    err = lambda q: ((dequantize(q) - w) ** 2).view(64, 4, 64).sum(-1)  # noqa: E731 (per group)
    e_plain, e_fitted = err(plain), err(fitted)
    finite = e_plain.isfinite()
    assert bool((e_fitted[finite] <= e_plain[finite] * (1 + 1e-6)).all())
    assert e_fitted[finite].sum() < 0.9 * e_plain[finite].sum()
    assert torch.equal(dequantize(fitted)[3, :64], torch.full((64,), 0.25))
    assert dequantize(fitted)[5, 64:128].isnan().all()
    assert torch.equal(dequantize(fitted)[:, :64][:2], dequantize(quantize(w[:2], config, fitted=True))[:, :64])


def test_the_weight_method_is_part_of_the_settings_and_checked():
    assert CompressionConfig().weight_method == "fitted"
    assert CompressionConfig(weight_method="minmax") != CompressionConfig()
    with pytest.raises(UserError, match="weight_method='best' is not one of fitted, minmax"):
        CompressionConfig(weight_method="best")

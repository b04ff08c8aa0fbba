"""The one tensor walk, summary and comparison (:mod:`ckptctl.tensors`): exact by default.

With ``atol == 0`` tensors are equal only when dtype, shape and every byte agree; a float64
comparison would call ``-0.0``/``0.0``, NaNs with different payloads and int64
``2**53 + 1``/``2**53`` equal. Files are real: written by the library and loaded back
memory-mapped, as ``ckptctl diff`` loads them.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch

from ckptctl.tensors import (
    TensorComparison,
    compare_states,
    compare_tensors,
    find_nonfinite,
    flat_tensors,
    iter_tensors,
    summarize,
    tensor_bytes,
)
from ckptctl.torch_io import safe_load, write_checkpoint_file

BIG = 2**53


def _nan(payload: int) -> torch.Tensor:
    """A float32 NaN with the given low mantissa bits (a quiet NaN's payload)."""
    return torch.tensor([0x7FC00000 | payload], dtype=torch.int32).view(torch.float32)


def _round_trip(tmp_path, name: str, payload: dict) -> dict:
    """Write ``payload`` with the library's checkpoint writer and load it back memory-mapped."""
    write_checkpoint_file(tmp_path / name, payload)
    return safe_load(tmp_path / name, "cpu", mmap=True)


# --------------------------------------------------------------------------- walk and summary


def test_walk_names_every_nested_tensor_in_order():
    t = [torch.zeros(1) for _ in range(4)]
    state = {"agent": OrderedDict(w=t[0]), "opt": {"state": {0: {"m": t[1]}}, "groups": [{"lr": 0.1}]}, "rng": [t[2], (t[3],)], "n": 3}
    assert [name for name, _ in iter_tensors(state)] == ["agent.w", "opt.state.0.m", "rng.0", "rng.1.0"]
    assert all(a is b for (_, a), b in zip(iter_tensors(state), t))
    assert list(flat_tensors(state)) == ["agent.w", "opt.state.0.m", "rng.0", "rng.1.0"]
    assert tensor_bytes(state) == 4 * 4


def test_summary_of_a_model_and_of_an_optimizer():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    m = summarize(model.state_dict())
    assert m.tensors == 7 and m.dtypes == ("float32", "int64")  # BatchNorm's num_batches_tracked
    assert m.parameters == 4 * 3 + 3 + 3 * 4 and m.elements == m.parameters + 1
    assert m.bytes == m.parameters * 4 + 8
    o = summarize(opt.state_dict())
    assert o.parameters is None and o.tensors == 4 * 3  # step, exp_avg, exp_avg_sq per parameter
    assert o.to_json() == {"tensors": 12, "elements": o.elements, "bytes": o.bytes, "dtypes": ["float32"], "parameters": None}


def test_find_nonfinite_names_floating_tensors_only():
    state = {"a": torch.tensor([1.0, math.inf]), "b": torch.tensor([1, 2]), "c": [torch.tensor([1 + 1j, complex(math.nan, 0)])]}
    assert find_nonfinite(state) == ["a", "c.0"]


# --------------------------------------------------------------------------- exact comparison (atol 0)


def test_negative_zero_is_not_bit_identical_to_zero():
    a, b = torch.tensor([0.0, 1.0]), torch.tensor([-0.0, 1.0])
    assert bool((a == b).all())  # numerically equal...
    c = compare_tensors(a, b)
    assert c == TensorComparison("changed", 0.0, bit_identical=False)  # ...but not the same bytes
    assert compare_tensors(a, b, atol=1e-12) == TensorComparison("same", 0.0, bit_identical=False)


def test_nan_payloads_differ_and_equal_nans_are_the_same():
    a, b = _nan(0), _nan(1)
    assert math.isnan(a.item()) and math.isnan(b.item())
    assert compare_tensors(a, b).status == "changed"
    assert compare_tensors(a, a.clone()) == TensorComparison("same", 0.0, bit_identical=True)
    assert compare_tensors(a, b, atol=1e-3) == TensorComparison("same", 0.0)  # numerically NaN equals NaN
    assert compare_tensors(a, torch.tensor([1.0]), atol=1e9) == TensorComparison("changed", math.inf)


def test_int64_beyond_float64_precision_differs_exactly():
    a, b = torch.tensor([BIG + 1, 5]), torch.tensor([BIG, 5])
    assert float(BIG + 1) == float(BIG)  # what a float64 comparison sees
    c = compare_tensors(a, b)
    assert c.status == "changed" and c.max_abs_diff == 1 and isinstance(c.max_abs_diff, int)
    assert compare_tensors(a, b, atol=0.5).status == "changed"  # integers are compared in int64, not float64
    assert compare_tensors(a, b, atol=1.0) == TensorComparison("same", 1)


def test_integer_differences_are_exact_beyond_int64():
    lo, hi = torch.iinfo(torch.int64).min, torch.iinfo(torch.int64).max
    c = compare_tensors(torch.tensor([lo, 0, hi]), torch.tensor([hi, 0, lo]))
    assert c.max_abs_diff == 2**64 - 1
    c = compare_tensors(torch.tensor([BIG * 3]), torch.tensor([-BIG]))
    assert c.max_abs_diff == BIG * 4
    u = compare_tensors(torch.tensor([0, 7], dtype=torch.uint64), torch.tensor([2**64 - 1, 7], dtype=torch.uint64))
    assert u.status == "changed" and u.max_abs_diff == 2**64 - 1
    assert compare_tensors(torch.tensor([True, False]), torch.tensor([False, False])) == TensorComparison("changed", 1)
    assert compare_tensors(torch.tensor([3], dtype=torch.uint8), torch.tensor([250], dtype=torch.uint8)).max_abs_diff == 247


def test_shape_and_dtype_mismatches_and_layouts():
    assert compare_tensors(torch.zeros(2), torch.zeros(3)) == TensorComparison("shape")
    assert compare_tensors(torch.zeros(2), torch.zeros(2, dtype=torch.float64)) == TensorComparison("dtype")
    m = torch.arange(6.0).reshape(2, 3)
    assert compare_tensors(m.t(), m.t().contiguous()).bit_identical  # strides do not matter, values do
    assert compare_tensors(torch.tensor(2.5), torch.tensor(2.5)).bit_identical  # 0-dim
    assert compare_tensors(torch.zeros(0, 3), torch.zeros(0, 3)).bit_identical
    z = torch.tensor([1 + 2j])
    assert compare_tensors(z.conj(), torch.tensor([1 - 2j])).bit_identical  # a lazy conjugate is resolved
    assert compare_tensors(z, torch.tensor([1 + 2.5j])) == TensorComparison("changed", 0.5)
    half = compare_tensors(torch.tensor([1.0], dtype=torch.bfloat16), torch.tensor([1.5], dtype=torch.bfloat16), atol=0.25)
    assert half == TensorComparison("changed", 0.5)


def test_float_tolerance_and_infinities():
    a, b = torch.tensor([1.0, math.inf, -math.inf]), torch.tensor([1.25, math.inf, -math.inf])
    assert compare_tensors(a, b) == TensorComparison("changed", 0.25)
    assert compare_tensors(a, b, atol=0.25) == TensorComparison("same", 0.25)
    assert compare_tensors(a, b, atol=0.2).status == "changed"
    assert compare_tensors(torch.tensor([math.inf]), torch.tensor([-math.inf]), atol=1e300).max_abs_diff == math.inf


# --------------------------------------------------------------------------- whole states, through real files


def test_compare_states_through_real_files(tmp_path):
    base = {"agent": {"w": torch.tensor([0.0, 1.0]), "n": _nan(0)}, "step": torch.tensor([BIG]), "rng": [torch.zeros(3, dtype=torch.uint8)]}
    other = {
        "agent": {"w": torch.tensor([-0.0, 1.0]), "n": _nan(1)},
        "step": torch.tensor([BIG + 1]),
        "rng": [torch.zeros(3, dtype=torch.uint8)],
        "extra": torch.ones(1),
    }
    a = _round_trip(tmp_path, "a.pt", base)
    again = _round_trip(tmp_path, "again.pt", base)
    b = _round_trip(tmp_path, "b.pt", other)
    assert all(r.bit_identical and r.status == "same" for r in compare_states(a, again))
    rows = {r.name: r for r in compare_states(a, b)}
    assert list(rows) == sorted(rows)
    assert {n: r.status for n, r in rows.items()} == {
        "agent.n": "changed", "agent.w": "changed", "step": "changed", "rng.0": "same", "extra": "only_b",
    }
    assert rows["step"].max_abs_diff == 1 and rows["agent.w"].max_abs_diff == 0.0
    assert rows["extra"].to_json() == {"name": "extra", "status": "only_b", "shape_a": None, "shape_b": [1], "max_abs_diff": None}
    loose = {r.name: r.status for r in compare_states(a, b, atol=0.5)}
    assert loose == {"agent.n": "same", "agent.w": "same", "step": "changed", "rng.0": "same", "extra": "only_b"}

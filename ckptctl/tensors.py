"""Tensors in a checkpoint: the one walk over a payload, its summary, and exact comparison.

Same layer as :mod:`ckptctl.torch_io` (a torch importer below the persistence API; it
imports nothing else of ckptctl). Everything that names, counts or compares the tensors
of a state uses these functions: ``verify --deep``, ``show``, ``diff``, the trainloop demo
and the tests.

Comparison is exact by default: with ``atol == 0`` two tensors are equal only when their
dtype, shape and every byte agree, so ``-0.0`` differs from ``0.0``, NaNs with different
payloads differ, and int64 ``2**53 + 1`` differs from ``2**53`` (a float64 comparison
would call all three equal). With ``atol > 0`` values are compared numerically: floats
within ``atol`` (NaN equal to NaN at the same position), integers exactly in int64.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Union

import torch

#: The largest absolute difference between two tensors: an ``int`` for integer and bool
#: tensors (exact, beyond float64's 2**53), a ``float`` for floating and complex ones.
Number = Union[int, float]


# --------------------------------------------------------------------------- walk


def iter_tensors(obj: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(dotted_name, tensor)`` for every tensor nested in dicts/lists/tuples of ``obj``.

    Example: ``{"agent": {"w": t}, "rng": [s]}`` gives ``("agent.w", t)`` and ``("rng.0", s)``.
    """
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from iter_tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from iter_tensors(v, f"{prefix}.{i}" if prefix else str(i))


def map_nested(obj: Any, fn: Callable[[Any, tuple], tuple[bool, Any]], key: tuple = ()) -> Any:
    """Rebuild ``obj`` (nested dicts, lists, tuples) with ``fn`` applied top-down.

    ``fn(value, key)`` returns ``(True, replacement)`` to replace ``value`` (not descending
    into it) or ``(False, None)`` to keep it and descend. ``key`` is the path of dict keys
    and list indices. OrderedDicts keep their type and their ``_metadata`` (module state
    dicts' versions); named tuples and other objects are kept as they are.
    """
    replaced, value = fn(obj, key)
    if replaced:
        return value
    if isinstance(obj, OrderedDict):
        rebuilt = OrderedDict((k, map_nested(v, fn, key + (k,))) for k, v in obj.items())
        if hasattr(obj, "_metadata"):
            rebuilt._metadata = copy.deepcopy(obj._metadata)
        return rebuilt
    if isinstance(obj, dict):
        return {k: map_nested(v, fn, key + (k,)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [map_nested(v, fn, key + (i,)) for i, v in enumerate(obj)]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(map_nested(v, fn, key + (i,)) for i, v in enumerate(obj))
    return obj


def flat_tensors(obj: Any) -> dict[str, torch.Tensor]:
    """``{dotted_name: tensor}`` of :func:`iter_tensors` (a later duplicate name wins)."""
    return dict(iter_tensors(obj))


def tensor_bytes(obj: Any) -> int:
    """Total bytes of the tensors nested in ``obj``."""
    return sum(t.numel() * t.element_size() for _, t in iter_tensors(obj))


def find_nonfinite(payload: Mapping[str, Any]) -> list[str]:
    """Names of floating (or complex) tensors in ``payload`` that hold NaN or infinity."""
    bad = []
    for name, tensor in iter_tensors(payload):
        if tensor.is_floating_point() or tensor.is_complex():
            if not bool(torch.isfinite(tensor).all()):
                bad.append(name)
    return bad


# --------------------------------------------------------------------------- summary


@dataclass(frozen=True)
class TensorSummary:
    """The tensors of one component: how many, their elements, bytes and dtypes.

    ``parameters`` (floating elements) is set only for a model-like state: a non-empty
    mapping whose values are all tensors; None otherwise (an optimizer's state).
    """

    tensors: int
    elements: int
    bytes: int
    dtypes: tuple[str, ...]
    parameters: int | None

    def to_json(self) -> dict[str, Any]:
        """The form ``show --json`` prints for a component."""
        return {
            "tensors": self.tensors,
            "elements": self.elements,
            "bytes": self.bytes,
            "dtypes": list(self.dtypes),
            "parameters": self.parameters,
        }


def summarize(state: Any) -> TensorSummary:
    """Summarise the tensors nested in one component's state (see :class:`TensorSummary`)."""
    tensors = [t for _, t in iter_tensors(state)]
    is_model = isinstance(state, Mapping) and bool(state) and all(isinstance(v, torch.Tensor) for v in state.values())
    return TensorSummary(
        tensors=len(tensors),
        elements=sum(t.numel() for t in tensors),
        bytes=tensor_bytes(tensors),
        dtypes=tuple(sorted({str(t.dtype).replace("torch.", "") for t in tensors})),
        parameters=sum(t.numel() for t in tensors if t.is_floating_point()) if is_model else None,
    )


# --------------------------------------------------------------------------- compare


@dataclass(frozen=True)
class TensorComparison:
    """How two tensors compare.

    ``status``: ``same``, ``changed``, ``shape`` (shapes differ) or ``dtype`` (dtypes differ).
    ``max_abs_diff``: the largest ``|a - b|`` when shapes and dtypes agree (an exact int
    for integer tensors; ``inf`` where a NaN meets a number), None otherwise.
    ``bit_identical``: dtype, shape and every byte agree.
    """

    status: str
    max_abs_diff: Number | None = None
    bit_identical: bool = False

    @property
    def same(self) -> bool:
        """True when the tensors count as equal under the ``atol`` they were compared with."""
        return self.status == "same"


def compare_tensors(a: torch.Tensor, b: torch.Tensor, atol: float = 0.0) -> TensorComparison:
    """Compare two tensors: bytes when ``atol == 0`` (the default), values within ``atol`` otherwise.

    With ``atol == 0`` they are the same iff dtype, shape and bytes are identical. With
    ``atol > 0`` floating values count as the same when ``|a - b| <= atol`` (NaN equals NaN,
    an infinity equals itself) and integer values are compared exactly in int64.
    """
    if a.shape != b.shape:
        return TensorComparison("shape")
    if a.dtype != b.dtype:
        return TensorComparison("dtype")
    a, b = _plain(a), _plain(b)
    if _same_bytes(a, b):
        return TensorComparison("same", 0 if _is_integral(a) else 0.0, bit_identical=True)
    worst = _max_abs_diff(a, b)
    same = atol > 0 and worst <= atol  # a Python int compares with a float exactly
    return TensorComparison("same" if same else "changed", worst)


def _plain(t: torch.Tensor) -> torch.Tensor:
    """A dense, contiguous CPU tensor with no lazy conjugation or negation, holding ``t``'s values."""
    t = t.detach()
    if t.is_quantized:
        t = t.dequantize()
    if t.layout != torch.strided:
        t = t.to_dense()
    return t.cpu().resolve_conj().resolve_neg().contiguous()


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def _is_integral(t: torch.Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex())


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> Number:
    """The largest ``|a - b|`` of two tensors of one dtype and shape (see :class:`TensorComparison`)."""
    if a.numel() == 0:
        return 0 if _is_integral(a) else 0.0
    if _is_integral(a):
        return _max_abs_int_diff(_as_ordered_int64(a), _as_ordered_int64(b))
    if a.is_complex():
        a, b = torch.view_as_real(a), torch.view_as_real(b)
    x, y = a.to(torch.float64), b.to(torch.float64)
    delta = (x - y).abs()
    delta = torch.where((x == y) | (torch.isnan(x) & torch.isnan(y)), torch.zeros_like(delta), delta)
    delta = torch.where(torch.isnan(delta), torch.full_like(delta, math.inf), delta)  # a NaN against a number
    return float(delta.max())


def _as_ordered_int64(t: torch.Tensor) -> torch.Tensor:
    """Integer or bool values as int64 with their order and differences kept (uint64 shifted by 2**63)."""
    if t.dtype == torch.uint64:
        return torch.bitwise_xor(t.view(torch.int64), torch.iinfo(torch.int64).min)
    return t.to(torch.int64)


def _max_abs_int_diff(x: torch.Tensor, y: torch.Tensor) -> int:
    """The largest ``|x - y|`` of two int64 tensors, exactly, although it may exceed int64.

    ``x - y`` wraps modulo 2**64; taken in the direction that is not negative, the true
    difference lies in [0, 2**64), so a wrapped (negative) result is that difference less 2**64.
    """
    d = torch.where(x >= y, x - y, y - x)
    wrapped = d < 0
    if bool(wrapped.any()):
        return int(d[wrapped].max()) + 2**64
    return int(d.max())


@dataclass(frozen=True)
class TensorDiff:
    """How one named tensor of two states compares: ``status`` is same / changed / shape / dtype / only_a / only_b."""

    name: str
    status: str
    shape_a: tuple[int, ...] | None
    shape_b: tuple[int, ...] | None
    max_abs_diff: Number | None = None
    bit_identical: bool = False

    def to_json(self) -> dict[str, Any]:
        """One row of ``diff --json``'s ``tensors`` (a non-finite difference is null)."""
        worst = self.max_abs_diff
        return {
            "name": self.name,
            "status": self.status,
            "shape_a": list(self.shape_a) if self.shape_a is not None else None,
            "shape_b": list(self.shape_b) if self.shape_b is not None else None,
            "max_abs_diff": worst if worst is None or isinstance(worst, int) or math.isfinite(worst) else None,
        }


def compare_states(a: Any, b: Any, atol: float = 0.0) -> list[TensorDiff]:
    """Compare every tensor nested in ``a`` and ``b`` by name (see :func:`compare_tensors`), sorted by name.

    A name in only one of them is ``only_a`` / ``only_b``.
    """
    ta, tb = flat_tensors(a), flat_tensors(b)
    rows: list[TensorDiff] = []
    for name in sorted(set(ta) | set(tb)):
        if name not in tb:
            rows.append(TensorDiff(name, "only_a", tuple(ta[name].shape), None))
        elif name not in ta:
            rows.append(TensorDiff(name, "only_b", None, tuple(tb[name].shape)))
        else:
            c = compare_tensors(ta[name], tb[name], atol)
            rows.append(TensorDiff(name, c.status, tuple(ta[name].shape), tuple(tb[name].shape), c.max_abs_diff, c.bit_identical))
    return rows


def jsonable(obj: Any) -> Any:
    """``obj`` as JSON data for display: a tensor becomes ``<tensor (shape) dtype>``, non-finite floats None, other objects their repr."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return f"<tensor {tuple(obj.shape)} {str(obj.dtype).replace('torch.', '')}>"
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    return repr(obj)

"""The components of a load call: passed by name, or by position in the order the checkpoint saved them.

``p.load_best_model(agent, qwen, optimizer, device="cuda")`` binds ``agent`` to the first
component the file saved, ``qwen`` to the second, and so on, as a Python call binds
positional arguments to parameters. Keyword components (``agent=model``) work as before
and may be mixed with positional ones when no name is bound twice. With any positional
component every saved component must be given (one way or the other); keyword-only calls
may load a subset, as always.

The saved order (:func:`saved_order`) is, in this order of preference:

- ``component_order``, recorded by ckptctl since positional loads exist;
- otherwise the file's own key order less the reserved keys (``epoch``, ``metrics``,
  ``rng``...): for ckptctl's first files (whose ``components`` list is sorted by name)
  that is the order the components were passed to the save, which wrote them one by one
  in that order; for the Colab guide's plain ``torch.save`` dicts it is the order the
  guide's dict literal gave them (``agent``, ``qwen``, ``solver2``, ``efe_loss``,
  ``policy_rl``, ``optimizer``), keeping only entries that are state dicts.

Everything about the call that can be checked without the file (the device, that every
positional argument is a component) is checked before any file is read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from ckptctl.core.format import RESERVED_CHECKPOINT_KEYS
from ckptctl.torch_io import check_device, is_device


class DefaultDevice(str):
    """The ``device`` default (``"cpu"``) of the load calls, told apart from a ``"cpu"`` the caller gave."""

    __slots__ = ()


#: ``device="cpu"`` as a default: a first positional device (the calls' old signature) may replace it.
DEFAULT_DEVICE = DefaultDevice("cpu")


def _is_component(obj: Any) -> bool:
    return callable(getattr(obj, "load_state_dict", None))


def _kind(obj: Any) -> str:
    return type(obj).__name__


@dataclass(frozen=True)
class LoadCall:
    """One call of ``resume`` / ``load_checkpoint`` / ``load_best_model``: its device and its components."""

    method: str
    device: Any
    positional: tuple[Any, ...] = ()
    named: Mapping[str, Any] = field(default_factory=dict)

    def bind(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        """``{name: component}``: the named ones, and the positional ones bound to ``payload``'s saved order.

        Raises TypeError (naming the objects passed and the names saved) when a name would be
        bound twice or the count does not match.
        """
        if not self.positional:
            return dict(self.named)
        order = saved_order(payload)
        bound = dict(zip(order, self.positional))
        twice = [name for name in bound if name in self.named]
        if twice:
            raise TypeError(f"{self.method}() got component {twice[0]!r} twice, by position and by name{self._listing(order)}")
        missing = [name for name in order if name not in bound and name not in self.named]
        if len(self.positional) > len(order) or missing:
            raise TypeError(self._count_message(order))
        return {**bound, **self.named}

    def _listing(self, order: list[str]) -> str:
        passed = ", ".join(_kind(obj) for obj in self.positional)
        saved = ", ".join(order) or "none"
        return f" (passed by position: {passed}; the checkpoint saved, in order: {saved})"

    def _count_message(self, order: list[str]) -> str:
        named = [name for name in order if name in self.named]
        expected = len(order) - len(named)
        by_name = f" ({len(named)} more by name: {', '.join(named)})" if named else ""
        return (
            f"{self.method}() got {len(self.positional)} component(s) by position, but the checkpoint saved "
            f"{len(order)}{by_name}, so {expected} by position are expected{self._listing(order)}; "
            f"pass one object per saved component in that order, or pass them by name ({order[0] if order else 'agent'}=...)"
        )


def load_call(method: str, positional: tuple[Any, ...], device: Any, named: Mapping[str, Any]) -> LoadCall:
    """Check a load call before any file is read; return it for :meth:`LoadCall.bind`.

    A first positional argument that is a device and not a component is the device (the
    calls took ``device`` as their first positional parameter before); given as well as
    ``device=`` it is a TypeError. ``device`` must be a device (TypeError naming it
    otherwise, :func:`ckptctl.torch_io.check_device`) usable here
    (:class:`DeviceUnavailableError` otherwise). Every other positional argument must be a
    component (have ``load_state_dict``): a TypeError naming it otherwise.
    """
    positional = tuple(positional)
    if positional and is_device(positional[0]) and not _is_component(positional[0]):
        if not isinstance(device, DefaultDevice):
            raise TypeError(f"{method}() got the device twice: {positional[0]!r} by position and {device!r} by name")
        device, positional = positional[0], positional[1:]
    check_device(device)
    for n, obj in enumerate(positional, 1):
        if not _is_component(obj):
            shown = repr(obj) if is_device(obj) else f"a {_kind(obj)}"
            raise TypeError(
                f"{method}() positional argument {n} is {shown}, not a component (it has no load_state_dict()); "
                "pass the device as device=..."
            )
    return LoadCall(method, str(device) if isinstance(device, DefaultDevice) else device, positional, dict(named))


def saved_order(payload: Mapping[str, Any]) -> list[str]:
    """The names of the components ``payload`` saved, in the order they were saved (see the module docstring)."""
    recorded = payload.get("component_order")
    if isinstance(recorded, list) and all(isinstance(name, str) and name in payload for name in recorded):
        return list(recorded)
    names = [name for name in payload if isinstance(name, str) and name not in RESERVED_CHECKPOINT_KEYS]
    if "format_version" in payload:
        return names
    return [name for name in names if isinstance(payload[name], Mapping)]  # other code's dict: only its state dicts

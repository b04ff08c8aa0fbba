"""The typer classes of the ``ckptctl`` app: plain usage lines, and no pydantic for plain values.

- Usage lines name arguments as ``--help`` lists them: ``ckptctl show [OPTIONS] PATH [ID]``
  (typer writes a required argument as ``{PATH}``).
- typer 0.29 turns every value (a bool flag's ``None`` default too) into its type through a
  pydantic ``TypeAdapter``, built on first use: ``ckptctl ls`` then imports pydantic, which
  took its start from about 0.37 s to 0.65 s of CPU (numbers in pyproject.toml). A ``str``,
  ``Path`` or ``bool`` parameter without typer's path checks needs none of that:
  :class:`PlainValues` (the app's group and every :class:`Command`) gives those parameters a
  :class:`PlainValue` instead, so ``ls``, ``--help`` and every command's ``--help`` start
  without pydantic on typer 0.28 and 0.29 alike (int and float options still go through
  typer's own coercion). It fills typer's ``_runtime_param`` slot (0.29+); on a typer
  without that slot nothing changes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import typer
from typer.core import TyperCommand

#: typer's path checks (``exists=True``, ...) at the values that ask for none.
_NO_PATH_CHECKS = {
    "parser": None, "exists": False, "file_okay": True, "dir_okay": True, "writable": False,
    "readable": True, "resolve_path": False, "allow_dash": False, "path_type": None,
}


_TRUE = ("1", "true", "t", "yes", "y", "on")
_FALSE = ("0", "false", "f", "no", "n", "off")


class PlainValue:
    """A ``str``, ``Path`` or ``bool`` parameter's value from the command line, without typer's pydantic coercion."""

    def __init__(self, kind: type) -> None:
        self.kind = kind

    def coerce(self, value: Any, param: Any = None, ctx: Any = None) -> Any:
        """``value`` (a str, bytes from the command line, or the default) as :attr:`kind`; None stays None."""
        if value is None or isinstance(value, self.kind):
            return value
        if isinstance(value, bytes):
            value = os.fsdecode(value)
        if self.kind is bool:
            word = str(value).strip().lower()
            if word not in _TRUE + _FALSE:
                raise typer.BadParameter(f"{value!r} is not a valid boolean", ctx=ctx, param=param)
            return word in _TRUE
        return self.kind(value)


def plain_value(param: Any) -> PlainValue | None:
    """The :class:`PlainValue` for ``param`` when typer would coerce it with pydantic and need not; else None."""
    descriptor = getattr(param, "type_descriptor", None)
    if descriptor is None or getattr(param, "_runtime_param", False) is not None:
        return None  # typer before 0.29, or a parameter typer has set up already
    if descriptor.annotation not in (str, Path, bool) or param.nargs != 1 or getattr(param, "multiple", False):
        return None
    info = descriptor.parameter_info
    if any(getattr(info, name, default) != default for name, default in _NO_PATH_CHECKS.items()):
        return None
    return PlainValue(descriptor.annotation)


def use_plain_values(params: list[Any]) -> None:
    """Give each of ``params`` that can do without pydantic its :class:`PlainValue` (a command's or the app's own)."""
    for param in params:
        plain = plain_value(param)
        if plain is not None:
            param._runtime_param = plain


class PlainValues:
    """Mixin for a typer command or group: its str/Path/bool parameters take :class:`PlainValue` (see the module).

    Set on the parameters click parses, ``--help`` included, as it gets them: typer adds
    the app's completion options after building the group, click the help option per call.
    """

    def get_params(self, ctx: Any) -> list[Any]:
        """Click's parameters of this command, those that can do without pydantic given their :class:`PlainValue`."""
        params = super().get_params(ctx)  # type: ignore[misc]
        use_plain_values(params)
        return params


class Command(PlainValues, TyperCommand):
    """A ``ckptctl`` command: plain usage line; str/Path/bool values without pydantic (see the module)."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        """Typer's usage pieces without the braces it puts around a required argument (``{PATH}``)."""
        pieces = super().collect_usage_pieces(ctx)
        return [p[1:-1] if p.startswith("{") and p.endswith("}") else p for p in pieces]


class App(typer.Typer):
    """The ``ckptctl`` app: every command is a :class:`Command` unless it names its own class."""

    def command(self, *args: Any, cls: Any = None, **kwargs: Any) -> Any:
        """typer's ``@app.command``, with :class:`Command` as the default class."""
        return super().command(*args, cls=cls or Command, **kwargs)

"""Write the shell completion scripts for ``ckptctl`` into ``completions/`` (run: ``python -m ckptctl.completions_gen``).

The scripts come from the app's own completion support (typer), so they stay in step
with the commands: each asks ``ckptctl`` itself for candidates (subcommands, options,
run names) through the ``_CKPTCTL_COMPLETE`` protocol. A test in ``tests/test_cli_contract.py``
generates them afresh and fails if the committed files differ.
"""

from __future__ import annotations

import sys
from pathlib import Path

PROG = "ckptctl"
COMPLETE_VAR = "_CKPTCTL_COMPLETE"

#: shell -> file name under completions/ (the names each shell's loader looks for).
FILES = {"bash": "ckptctl.bash", "zsh": "_ckptctl", "fish": "ckptctl.fish"}


def completion_script(shell: str) -> str:
    """The completion script for ``shell`` (bash, zsh or fish), ending with a newline."""
    from typer._completion_shared import get_completion_script

    script = get_completion_script(prog_name=PROG, complete_var=COMPLETE_VAR, shell=shell)
    if shell == "zsh":
        # Work both when sourced (~/.zshrc) and when autoloaded from $fpath as _ckptctl.
        script = script.replace(
            f"compdef _{PROG}_completion {PROG}",
            f'if [[ "${{zsh_eval_context[-1]}}" == loadautofunc ]]; then\n'
            f'  _{PROG}_completion "$@"\n'
            f"else\n"
            f"  compdef _{PROG}_completion {PROG}\n"
            f"fi",
        )
    return script.rstrip("\n") + "\n"


def generate(out_dir: str | Path) -> list[Path]:
    """Write every script into ``out_dir``; return the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for shell, name in FILES.items():
        path = out_dir / name
        path.write_text(completion_script(shell), encoding="utf-8")
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    """Regenerate the scripts into the folder given (default: ``completions`` next to the package)."""
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0]) if argv else Path(__file__).resolve().parent.parent / "completions"
    for path in generate(out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

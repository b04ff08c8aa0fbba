"""``python -m ckptctl`` runs the CLI (same as the ``ckptctl`` console script)."""

from ckptctl.cli import main

main()

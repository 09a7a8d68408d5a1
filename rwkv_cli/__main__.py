"""``python -m rwkv_cli`` runs the ``rwkv`` command."""

from rwkv_cli.cli import main

main()

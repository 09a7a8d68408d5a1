"""``python -m rwkv_cli`` runs the ``rwkv`` command."""

from rwkv_cli.entry import main

main()

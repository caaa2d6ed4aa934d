"""``python -m filterx`` (and ``torchrun -m filterx``) runs the command line."""

from filterx.cli.commands import main

main()

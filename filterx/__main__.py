"""``python -m filterx`` (and ``torchrun -m filterx``) runs the command line."""

from filterx.cli import main

main()

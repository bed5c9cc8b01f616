"""``python -m preftune`` (and ``torchrun -m preftune run config.toml``): the command line."""

from .cli import main

main()

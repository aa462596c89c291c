"""python -m bridge: the bridge command line."""

from .cli import main

main()

"""Allow `python -m eobblast`."""

from eobblast.cli import main

main()

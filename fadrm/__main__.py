"""``python -m fadrm``: the command line, where no ``fadrm`` script is on the PATH."""

from fadrm.cli import main

main()

"""`python -m transmla`: the same command line as `transmla`."""

from transmla.cli import main

main()

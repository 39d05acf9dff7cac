"""`python -m sdlite ...`: the same as the `sdlite` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())

"""`python -m bench.attribution`: see the package docstring."""

import sys

from bench.attribution.cli import main

if __name__ == "__main__":
    sys.exit(main())

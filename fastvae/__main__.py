"""``python -m fastvae ...``: the same as the ``fastvae`` console script (see :mod:`fastvae.cli`)."""

import sys

from fastvae.cli import main

if __name__ == "__main__":
    sys.exit(main())

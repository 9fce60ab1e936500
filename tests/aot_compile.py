"""Kept for old instructions: ``python tests/aot_compile.py`` is ``python -m bench.static --arch 90``.

The static analysis (AOT compile for sm_90 / sm_80, registers, spills, access widths, SASS instructions
per element, roofline ratios) lives in ``bench/static.py``; ``tests/test_aot_sm90.py`` holds its budgets.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.static import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["--arch", "90", *sys.argv[1:]]))

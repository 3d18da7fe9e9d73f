#!/usr/bin/env python3
"""`scripts/collect_inaturalist.py ...` runs `collect-inaturalist ...` from a checkout.

The collector is the package `species_tools.collector` (tools/); it also uses the image's
atomic writes (container/code). This wrapper puts both first on the path, so that the
checkout's code runs even where an older copy is installed.
"""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tools"), str(REPO / "container" / "code")]

from species_tools.collector.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

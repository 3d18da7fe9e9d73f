#!/usr/bin/env python3
"""`run-job` from a clone: the launcher lives in tools/species_tools/launcher (docs/sagemaker.md)."""

import sys
from pathlib import Path

# This clone's launcher and the metric definitions it sends, ahead of any installed copy.
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tools"), str(ROOT / "container" / "code")]

from species_tools.launcher.cli import main  # noqa: E402 - needs the path above

if __name__ == "__main__":
    sys.exit(main())

"""Which CSV of the training channel describes the photos, its columns and the catch-all class:
one rule for the container, the launcher and the collector, so a folder the launcher accepts
is one the training job accepts.

Only the channel's top level is searched (a CSV among the photos is data, not the index), and
this module imports nothing heavy: the launcher runs it on a laptop without torch or numpy.
"""

from __future__ import annotations

from pathlib import Path

REQUIRED_COLUMNS = ("species_name", "image_name")
# The class of every species not in target_species.
OTHER = "other"


class DatasetError(ValueError):
    """The training data cannot be used as it is; the message says why and what to do."""


def find_csv(channel_dir: Path, csv_file: str | None) -> Path:
    """The CSV named by `csv_file`, or the only CSV in the channel."""
    if not channel_dir.is_dir():
        raise DatasetError(
            f"training channel {channel_dir} does not exist: give the job an input channel "
            "named 'training' holding the CSV and the photos"
        )
    if csv_file:
        path = channel_dir / csv_file
        if not path.is_file():
            found = sorted(p.name for p in channel_dir.glob("*.csv"))
            raise DatasetError(
                f"csv_file={csv_file!r} is not in the training channel (CSVs there: {found})"
            )
        return path
    candidates = sorted(channel_dir.glob("*.csv"))
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise DatasetError(
            f"no CSV in the training channel {channel_dir}: add one with the columns "
            f"{', '.join(REQUIRED_COLUMNS)}"
        )
    names = ", ".join(p.name for p in candidates)
    raise DatasetError(f"several CSVs in the training channel ({names}): name one with csv_file")

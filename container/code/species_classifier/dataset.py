"""From the training channel's CSV to labelled photos and stratified folds.

The seed's method: each row's label is its species when that is a target species, else
`other`; classes are sorted (as scikit-learn's LabelEncoder orders them); `other` can be
downsampled for dry runs; folds come from a seeded, shuffled StratifiedKFold, and
`k_folds=1` means one stratified 70/30 hold-out split. Every check here fails with a
message that says what is wrong with the data and how to fix it.
"""

from __future__ import annotations

import csv
import difflib
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedKFold, train_test_split

from species_classifier.channel import REQUIRED_COLUMNS, DatasetError, find_csv  # noqa: F401

OTHER = "other"
HOLDOUT_FRACTION = 0.3


@dataclass(frozen=True)
class LabelledPhotos:
    """One entry per usable CSV row, in CSV order."""

    paths: list[Path]
    species: list[str]
    labels: np.ndarray
    classes: list[str]

    def subset(self, keep: np.ndarray) -> LabelledPhotos:
        indices = np.flatnonzero(keep)
        return LabelledPhotos(
            paths=[self.paths[i] for i in indices],
            species=[self.species[i] for i in indices],
            labels=self.labels[indices],
            classes=self.classes,
        )

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels, minlength=len(self.classes))
        return dict(zip(self.classes, counts.tolist(), strict=True))


def read_rows(csv_path: Path) -> list[tuple[str, str]]:
    """(species_name, image_name) for each row; columns and empty cells checked."""
    with csv_path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = [c.strip() for c in reader.fieldnames or []]
        missing = [c for c in REQUIRED_COLUMNS if c not in columns]
        if missing:
            raise DatasetError(
                f"{csv_path.name} lacks the column(s) {', '.join(missing)}: it has "
                f"{columns or 'no header'}; rename the columns or fix the header line"
            )
        reader.fieldnames = columns
        rows, blank_lines = [], []
        for line, row in enumerate(reader, start=2):
            species, image = (str(row.get(c) or "").strip() for c in REQUIRED_COLUMNS)
            if not species or not image:
                blank_lines.append(line)
            else:
                rows.append((species, image))
    if blank_lines:
        shown = ", ".join(map(str, blank_lines[:10]))
        raise DatasetError(
            f"{csv_path.name}: {len(blank_lines)} row(s) with an empty species_name or "
            f"image_name (lines {shown}{', ...' if len(blank_lines) > 10 else ''}): fill or delete them"
        )
    if not rows:
        raise DatasetError(f"{csv_path.name} has no data rows")
    return rows


def label_photos(
    rows: list[tuple[str, str]],
    channel_dir: Path,
    target_species: tuple[str, ...],
    downsample_other: bool,
    downsample_frac: float,
    seed: int,
) -> LabelledPhotos:
    """Targets keep their name, everything else is `other`; optionally thin out `other`."""
    present = Counter(species for species, _ in rows)
    for target in target_species:
        if target not in present:
            raise DatasetError(_missing_target_message(target, present))
    names = [species if species in target_species else OTHER for species, _ in rows]
    classes = sorted(set(names))
    index = {name: i for i, name in enumerate(classes)}
    photos = LabelledPhotos(
        paths=[channel_dir / image for _, image in rows],
        species=[species for species, _ in rows],
        labels=np.array([index[n] for n in names], dtype=np.int64),
        classes=classes,
    )
    if downsample_other and OTHER in index:
        others = np.flatnonzero(photos.labels == index[OTHER])
        keep_count = max(1, round(len(others) * downsample_frac))
        dropped = np.random.default_rng(seed).choice(
            others, len(others) - keep_count, replace=False
        )
        keep = np.ones(len(rows), dtype=bool)
        keep[dropped] = False
        photos = photos.subset(keep)
    return photos


def _missing_target_message(target: str, present: Counter) -> str:
    close = difflib.get_close_matches(target, present.keys(), n=3, cutoff=0.6)
    if close:
        hint = "closest species in the CSV: " + ", ".join(
            f"{n!r} ({present[n]} photos)" for n in close
        )
    else:
        common = ", ".join(f"{n!r} ({c})" for n, c in present.most_common(5))
        hint = f"most common species in the CSV: {common}"
    return f"target species {target!r} does not occur in the CSV; {hint}"


def minimum_per_class(k_folds: int) -> int:
    """Photos a class needs so that every fold validates on at least one of them."""
    return max(k_folds, 2)


def check_class_sizes(photos: LabelledPhotos, k_folds: int, unreadable: int = 0) -> None:
    needed = minimum_per_class(k_folds)
    counts = photos.class_counts()
    total, classes = len(photos.labels), len(counts)
    held_out = math.ceil(HOLDOUT_FRACTION * total)
    if k_folds == 1 and min(held_out, total - held_out) < classes:
        raise DatasetError(
            f"{total} photos are too few for the 70/30 hold-out (k_folds=1) of {classes} "
            f"classes: each side needs at least one photo per class, so at least "
            f"{math.ceil(classes / HOLDOUT_FRACTION)} photos. Add photos or use k_folds=2"
        )
    small = {name: count for name, count in counts.items() if count < needed}
    if small:
        split = f"k_folds={k_folds}" if k_folds > 1 else "the 70/30 hold-out (k_folds=1)"
        listed = ", ".join(f"{name!r} has {count}" for name, count in small.items())
        lost = f" after leaving out {unreadable} unreadable photo(s)" if unreadable else ""
        raise DatasetError(
            f"too few photos for {split}{lost}: {listed}; each class needs at least {needed}. "
            "Add photos of those classes or lower k_folds"
        )


def make_folds(labels: np.ndarray, k_folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train indices, validation indices) per fold: stratified, shuffled, seeded."""
    if k_folds == 1:
        train, val = train_test_split(
            np.arange(len(labels)), test_size=HOLDOUT_FRACTION, stratify=labels, random_state=seed
        )
        return [(np.sort(train), np.sort(val))]
    splitter = StratifiedKFold(n_splits=k_folds, shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros(len(labels)), labels))

"""From the training channel's CSV to labelled photos and stratified folds.

The seed's method: each row's label is its species when that is a target species, else
`other`; classes are sorted (as scikit-learn's LabelEncoder orders them); `other` can be
downsampled for dry runs; folds come from a seeded, shuffled StratifiedKFold, and
`k_folds=1` means one stratified 70/30 hold-out split. The CSV is read with pandas as
text, cell for cell: UTF-8 with or without a byte-order mark (Excel's "CSV UTF-8"),
UTF-16, or Windows-1252 (Excel's plain "CSV" on Windows); values in double quotes may hold
commas. Every check here fails with a message that says what is wrong with the data and
how to fix it.
"""

from __future__ import annotations

import codecs
import difflib
import io
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold, train_test_split

from species_classifier.contract.channel import OTHER, REQUIRED_COLUMNS, DatasetError

_log = logging.getLogger(__name__)

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
    table = _read_table(csv_path)
    columns = [str(c).strip() for c in table.columns]
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise DatasetError(
            f"{csv_path.name} lacks the column(s) {', '.join(missing)}: it has "
            f"{columns or 'no header'}; rename the columns or fix the header line"
        )
    table.columns = columns
    cells = table[list(REQUIRED_COLUMNS)].apply(lambda column: column.str.strip())
    blank = (cells == "").any(axis=1).to_numpy()
    if blank.any():
        # Line numbers as an editor shows them: the header is line 1.
        blank_lines = (np.flatnonzero(blank) + 2).tolist()
        shown = ", ".join(map(str, blank_lines[:10]))
        raise DatasetError(
            f"{csv_path.name}: {len(blank_lines)} row(s) with an empty species_name or "
            f"image_name (lines {shown}{', ...' if len(blank_lines) > 10 else ''}): fill or delete them"
        )
    if cells.empty:
        raise DatasetError(f"{csv_path.name} has no data rows")
    return list(cells.itertuples(index=False, name=None))


def _read_table(csv_path: Path) -> pd.DataFrame:
    """Every cell as text, as written: no missing-value guessing ("NA" is a name too)."""
    text = _decode(csv_path)
    try:
        return pd.read_csv(io.StringIO(text), dtype=str, na_filter=False, skipinitialspace=True)
    except pd.errors.EmptyDataError:
        return pd.DataFrame()
    except pd.errors.ParserError as error:
        raise DatasetError(
            f"{csv_path.name} is not a well-formed CSV: {_parser_problem(error)}"
        ) from None


def _decode(csv_path: Path) -> str:
    """UTF-8, with or without a byte-order mark; UTF-16 with one; else Windows-1252, the
    encoding of a CSV that Excel saved on Windows."""
    raw = csv_path.read_bytes()
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return raw.decode("utf-16")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as not_utf8:
        try:
            text = raw.decode("cp1252")
        except UnicodeDecodeError:
            raise DatasetError(
                f"{csv_path.name} is not UTF-8 text (byte 0x{raw[not_utf8.start]:02x} at "
                f"offset {not_utf8.start}): save it as CSV UTF-8"
            ) from None
        _log.warning("%s is not UTF-8: read it as Windows-1252 (cp1252)", csv_path.name)
        return text


def _parser_problem(error: pd.errors.ParserError) -> str:
    """pandas' tokenizer error, said with the line an editor shows, and what to do."""
    message = str(error)
    fields = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", message)
    if fields:
        expected, line, saw = fields.groups()
        return (
            f"line {line} has {saw} fields where the header has {expected}: put values that "
            'contain commas in double quotes ("Acer rubrum, red maple") or remove the extra commas'
        )
    quote = re.search(r"EOF inside string starting at row (\d+)", message)
    if quote:
        return (
            f"the double quote opened on line {int(quote[1]) + 1} is never closed: close it, "
            'or write a quote inside a value as two ("")'
        )
    return message.removeprefix("Error tokenizing data. C error: ").strip()


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

"""From the training channel's CSV to labelled photos and stratified, grouped folds.

The seed's method: each row's label is its species when that is a target species, else
`other`; classes are sorted (as scikit-learn's LabelEncoder orders them); `other` can be
downsampled for dry runs.

Groups: on iNaturalist an observation often has two to four photos of one individual, and
one observer photographs the same tree again and again. Photos of one group on both sides
of a split score the model on near-copies of what it trained on, so every split keeps
groups whole: `group_by` = `observation` (column `observation_uuid`), `observer` (column
`observer_id`) or `none` (every photo its own group, the seed's way); `auto` is
`observation` where the CSV has that column, else `none`. Folds come from a seeded,
shuffled StratifiedGroupKFold (StratifiedKFold, the seed's, without groups), and
`k_folds=1` means one 70/30 validation split of whole groups (`split_groups`), stratified as
closely as the groups allow. The CSV is read with pandas as
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
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from species_classifier.contract.channel import OTHER, REQUIRED_COLUMNS, DatasetError

_log = logging.getLogger(__name__)

# The share of the photos that validates the one model of k_folds=1 (the seed's dry run).
# Not the holdout (holdout.py), which is set aside before any split and chooses nothing.
VALIDATION_FRACTION = 0.3
# group_by -> the CSV column that names each photo's group (the collector writes both).
GROUP_COLUMNS = {"observation": "observation_uuid", "observer": "observer_id"}
# What a group is called in messages and the report.
GROUP_NOUNS = {"observation": "observations", "observer": "observers", "none": "photos"}


@dataclass(frozen=True)
class CsvRows:
    """The CSV's content that training uses, one entry per row in CSV order."""

    rows: list[tuple[str, str]]  # (species_name, image_name)
    group_by: str = "none"  # resolved: observation, observer or none
    groups: list[str] | None = None  # each row's group; None: every photo its own


@dataclass(frozen=True)
class LabelledPhotos:
    """One entry per usable CSV row, in CSV order."""

    paths: list[Path]
    species: list[str]
    labels: np.ndarray
    classes: list[str]
    groups: np.ndarray | None = None  # each photo's group id; None: every photo its own
    group_by: str = "none"

    @property
    def group_column(self) -> str | None:
        return GROUP_COLUMNS.get(self.group_by)

    def group_ids(self) -> np.ndarray:
        """What splits keep whole: the group of each photo, or its own row number."""
        return np.arange(len(self.labels)) if self.groups is None else self.groups

    def subset(self, keep: np.ndarray) -> LabelledPhotos:
        indices = np.flatnonzero(keep)
        return LabelledPhotos(
            paths=[self.paths[i] for i in indices],
            species=[self.species[i] for i in indices],
            labels=self.labels[indices],
            classes=self.classes,
            groups=None if self.groups is None else self.groups[indices],
            group_by=self.group_by,
        )

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels, minlength=len(self.classes))
        return dict(zip(self.classes, counts.tolist(), strict=True))

    def groups_per_class(self) -> dict[str, int]:
        """Distinct groups holding each class (photos, without groups)."""
        pairs = np.unique(np.stack([_codes(self.group_ids()), self.labels]), axis=1)
        counts = np.bincount(pairs[1], minlength=len(self.classes))
        return dict(zip(self.classes, counts.tolist(), strict=True))


def _codes(groups: np.ndarray) -> np.ndarray:
    return np.unique(groups, return_inverse=True)[1]


def read_rows(csv_path: Path, group_by: str = "none") -> CsvRows:
    """(species_name, image_name) for each row, and its group; columns and empty cells
    checked. `group_by` "auto" becomes observation where the CSV has observation_uuid."""
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
    rows = list(cells.itertuples(index=False, name=None))
    if group_by == "auto":
        group_by = "observation" if GROUP_COLUMNS["observation"] in columns else "none"
    if group_by == "none":
        return CsvRows(rows)
    column = GROUP_COLUMNS[group_by]
    if column not in columns:
        raise DatasetError(
            f"group_by={group_by} needs the column {column}, which {csv_path.name} lacks: add "
            "it (the collector writes it) or choose another group_by: auto, observation, "
            "observer or none"
        )
    ids = table[column].str.strip()
    # A photo without a group id is a group of its own, never one group of all the blanks.
    blank = ids == ""
    if blank.any():
        _log.warning(
            "%s: %d row(s) without %s: each is treated as its own %s",
            csv_path.name,
            int(blank.sum()),
            column,
            group_by,
        )
        ids = ids.where(~blank, "row " + pd.Series(range(len(ids)), index=ids.index).astype(str))
    return CsvRows(rows, group_by, ids.tolist())


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
    csv_rows: CsvRows,
    channel_dir: Path,
    target_species: tuple[str, ...],
    downsample_other: bool,
    downsample_frac: float,
    seed: int,
) -> LabelledPhotos:
    """Targets keep their name, everything else is `other`; optionally thin out `other`."""
    rows = csv_rows.rows
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
        groups=None if csv_rows.groups is None else np.array(csv_rows.groups, dtype=object),
        group_by=csv_rows.group_by,
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
    """Photos (or groups) a class needs so that every fold validates on at least one."""
    return max(k_folds, 2)


def check_class_sizes(photos: LabelledPhotos, k_folds: int, unreadable: int = 0) -> None:
    needed = minimum_per_class(k_folds)
    counts = photos.groups_per_class()
    noun = GROUP_NOUNS[photos.group_by]
    total, classes = len(photos.labels), len(counts)
    validated = math.ceil(VALIDATION_FRACTION * total)
    if k_folds == 1 and min(validated, total - validated) < classes:
        raise DatasetError(
            f"{total} photos are too few for the 70/30 validation split (k_folds=1) of "
            f"{classes} classes: each side needs at least one photo per class, so at least "
            f"{math.ceil(classes / VALIDATION_FRACTION)} photos. Add photos or use k_folds=2"
        )
    small = {name: count for name, count in counts.items() if count < needed}
    if small:
        split = f"k_folds={k_folds}" if k_folds > 1 else "the 70/30 validation split (k_folds=1)"
        listed = ", ".join(f"{name!r} has {count}" for name, count in small.items())
        lost = f" after leaving out {unreadable} unreadable photo(s)" if unreadable else ""
        if photos.group_by == "none":
            fix = "Add photos of those classes or lower k_folds"
        else:
            fix = (
                f"No {photos.group_by} is ever split, so add {noun} of those classes, lower "
                f"k_folds, or set group_by=none (which lets near-copies score each other)"
            )
        raise DatasetError(
            f"too few {noun} for {split}{lost}: {listed}; each class needs at least {needed}. "
            + fix
        )


def make_folds(
    labels: np.ndarray, k_folds: int, seed: int, groups: np.ndarray | None = None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train indices, validation indices) per fold: stratified, shuffled, seeded, and with
    `groups` no group on both sides."""
    if k_folds == 1:
        ids = np.arange(len(labels)) if groups is None else groups
        return [split_groups(labels, ids, VALIDATION_FRACTION, seed)]
    if groups is None:
        splitter = StratifiedKFold(n_splits=k_folds, shuffle=True, random_state=seed)
        return list(splitter.split(np.zeros(len(labels)), labels))
    grouped = StratifiedGroupKFold(n_splits=k_folds, shuffle=True, random_state=seed)
    return list(grouped.split(np.zeros(len(labels)), labels, _codes(groups)))


def split_groups(
    labels: np.ndarray, groups: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(kept, split off) indices: whole groups split off until each class has about
    `fraction` of its photos there, as closely as the groups allow.

    Greedy, largest groups first (ties in seeded random order): a group goes to the split-off
    side when that brings the per-class counts there closer to their targets. With one photo
    per group each class gets its share rounded to the nearest photo.
    """
    group_of = _codes(groups)
    counts = np.zeros((group_of.max() + 1, labels.max() + 1))
    np.add.at(counts, (group_of, labels), 1)
    target = fraction * counts.sum(axis=0)
    shuffled = np.random.default_rng(seed).permutation(len(counts))
    order = shuffled[np.argsort(-counts[shuffled].sum(axis=1), kind="stable")]
    taken = np.zeros(counts.shape[1])
    chosen = np.zeros(len(counts), dtype=bool)
    for group in order:
        closer = ((taken + counts[group] - target) ** 2).sum() <= ((taken - target) ** 2).sum()
        if closer:
            taken += counts[group]
            chosen[group] = True
    split_off = chosen[group_of]
    return np.flatnonzero(~split_off), np.flatnonzero(split_off)

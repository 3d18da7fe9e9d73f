#!/usr/bin/env python3
"""How fast the collector scans the open data's metadata, on generated files of the real
shape (gzip, tab-separated, unquoted; the columns and value widths of the monthly
snapshot), against the other way to read them (`csv.reader`), in one run.

Rows are spread over the globe, with 1% of them targets and look-alikes in the species box
of scripts/collect_inaturalist.example.toml and 2% anything in its Baltimore box, so that,
as on the real snapshot, most rows are read and dropped.
Three figures: `MetadataSource.rows` alone (one pass's reading), `csv.reader` doing the same
work, and the whole selection (five passes, the saving of each pass's progress, the cap)
over every row it read.

    .venv/bin/python scripts/bench_collector_scan.py [--observations 1000000]
        [--output docs/benchmarks/collector-scan-cpu.md]
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import os
import random
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tools"), str(REPO / "container" / "code")]

from machine import describe, publish  # noqa: E402
from species_tools.collector.metadata import (  # noqa: E402
    OBSERVATIONS,
    OBSERVERS,
    PHOTOS,
    TAXA,
    MetadataSource,
)
from species_tools.collector.scan_progress import ScanProgress  # noqa: E402
from species_tools.collector.selection import select_photos  # noqa: E402
from species_tools.collector.settings import load_settings  # noqa: E402

EXAMPLE = REPO / "scripts" / "collect_inaturalist.example.toml"
LICENSES = ("CC-BY-NC", "CC-BY", "CC0", "CC-BY-SA", "CC-BY-NC-SA", "CC-BY-NC-ND", "CC-BY-ND")
GRADES = ("research", "research", "needs_id", "casual")
TARGETS = ("Lycorma delicatula", "Zenaida macroura", "Acer rubrum", "Erigeron canadensis")
LOOKALIKES = ("Acer saccharum", "Acer saccharinum", "Acer platanoides")
OBSERVATION_COLUMNS = ("observation_uuid", "latitude", "longitude", "taxon_id", "quality_grade")


def write_tsv(path: Path, header: tuple[str, ...], rows) -> int:
    count = 0
    with gzip.open(path, "wt", encoding="utf-8", newline="\n") as out:
        out.write("\t".join(header) + "\n")
        for row in rows:
            out.write("\t".join(row) + "\n")
            count += 1
    return count


def generate(folder: Path, observations: int, taxa: int, observers: int) -> dict[str, int]:
    """The four files; photos are 1.3 per observation, as in the snapshot."""
    rng = random.Random(0)
    names = [*TARGETS, *LOOKALIKES]

    def taxa_rows():
        for taxon in range(1, taxa + 1):
            name = names[taxon - 1] if taxon <= len(names) else f"Genus{taxon} species{taxon}"
            ancestry = "/".join(str(rng.randrange(1, 999_999)) for _ in range(rng.randint(5, 12)))
            below = taxon > len(names) and taxon % 5 == 0
            rank, level = ("subspecies", "5") if below else ("species", "10")
            yield str(taxon), ancestry, level, rank, name, "true" if taxon % 40 else "false"

    uuids = [str(uuid.UUID(int=rng.getrandbits(128))) for _ in range(observations)]

    def observation_rows():
        for obs in uuids:
            where = rng.random()
            if where < 0.01:  # a target or look-alike in Maryland
                lat, lon, taxon = (
                    rng.uniform(38, 39.7),
                    rng.uniform(-79.4, -75.1),
                    rng.randint(1, 7),
                )
            elif where < 0.03:  # anything in Baltimore
                lat, lon, taxon = rng.uniform(39.2, 39.36), rng.uniform(-76.7, -76.53), 0
            else:
                lat, lon, taxon = rng.uniform(-60, 70), rng.uniform(-180, 180), 0
            taxon = taxon or rng.randrange(1, taxa + 1)
            yield (
                obs, str(rng.randrange(1, 9_000_000)), f"{lat:.10f}", f"{lon:.10f}",
                str(rng.randrange(1, 5000)), str(taxon),
                rng.choice(GRADES), "2023-06-14", f"{rng.random():.6f}",
            )  # fmt: skip

    def photo_rows():
        photo_id = 100_000_000
        for obs in uuids:
            for position in range(1 + (rng.random() < 0.3)):
                photo_id += rng.randrange(1, 20)
                yield (
                    str(uuid.UUID(int=rng.getrandbits(128))), str(photo_id), obs,
                    str(rng.randrange(1, observers + 1)), "jpeg", rng.choice(LICENSES),
                    "2048", "1536", str(position),
                )  # fmt: skip

    def observer_rows():
        for observer in range(1, observers + 1):
            yield str(observer), f"login{observer}", f"Given Family {observer}"

    return {
        TAXA: write_tsv(folder / TAXA, ("taxon_id", "ancestry", "rank_level", "rank", "name",
                                        "active"), taxa_rows()),
        OBSERVATIONS: write_tsv(folder / OBSERVATIONS, (
            "observation_uuid", "observer_id", "latitude", "longitude", "positional_accuracy",
            "taxon_id", "quality_grade", "observed_on", "anomaly_score"), observation_rows()),
        PHOTOS: write_tsv(folder / PHOTOS, (
            "photo_uuid", "photo_id", "observation_uuid", "observer_id", "extension", "license",
            "width", "height", "position"), photo_rows()),
        OBSERVERS: write_tsv(folder / OBSERVERS, ("observer_id", "login", "name"),
                             observer_rows()),
    }  # fmt: skip


def ours(folder: Path) -> int:
    return sum(1 for _ in MetadataSource(None, "", str(folder)).rows(OBSERVATIONS,
                                                                     OBSERVATION_COLUMNS))  # fmt: skip


def with_csv_reader(folder: Path) -> int:
    with gzip.open(folder / OBSERVATIONS, "rb") as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8", errors="replace", newline="")
        reader = csv.reader(text, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader)
        picks = [header.index(c) for c in OBSERVATION_COLUMNS]
        width = max(picks) + 1
        return sum(1 for cells in reader if len(cells) >= width and [cells[i] for i in picks])


class TimedProgress(ScanProgress):
    """The scan's progress, saved as the collector saves it, with the seconds that took."""

    seconds = 0.0

    def save(self, scan: dict) -> None:
        started = time.perf_counter()
        super().save(scan)
        self.seconds += time.perf_counter() - started


def timed(function, *args) -> tuple[float, float, object]:
    """(wall seconds, CPU seconds of this process, the result): on a machine shared with
    other work the CPU seconds are what one core of it takes."""
    started, cpu = time.perf_counter(), time.process_time()
    result = function(*args)
    return time.perf_counter() - started, time.process_time() - cpu, result


def row(what: str, rows: int, seconds: float, cpu: float) -> str:
    return f"| {what} | {rows:,} | {seconds:.1f} | {rows / seconds:,.0f} | {cpu:.1f} | {rows / cpu:,.0f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--observations", type=int, default=1_000_000)
    parser.add_argument("--taxa", type=int, default=100_000)
    parser.add_argument("--observers", type=int, default=200_000)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    load_before = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rows = generate(folder, args.observations, args.taxa, args.observers)
        sizes = {name: (folder / name).stat().st_size for name in rows}
        ours_s, ours_cpu, ours_rows = timed(ours, folder)
        csv_s, csv_cpu, csv_rows = timed(with_csv_reader, folder)
        assert ours_rows == csv_rows == rows[OBSERVATIONS], (ours_rows, csv_rows)
        settings = load_settings(
            ["--config", str(EXAMPLE), "--dest", str(folder / "dest"), "--metadata-dir", tmp]
        )
        progress = TimedProgress(folder / "progress", settings.dest, "bench", {})
        select_s, select_cpu, selection = timed(select_photos, settings, MetadataSource(None, "", tmp),
                                    progress)  # fmt: skip
        # Taxa are read twice; every other file once.
        scanned = sum(rows.values()) + rows[TAXA]
    lines = [
        f"Machine: {describe()}; load average at the start: {load_before}",
        "",
        "Files: "
        + ", ".join(
            f"{name} {rows[name]:,} rows ({sizes[name] / 1e6:.1f} MB)" for name in rows
        ),  # fmt: skip
        "",
        "| reading | rows | seconds | rows/s | CPU seconds | rows per CPU second |",
        "|---|---|---|---|---|---|",
        row(f"ours: `MetadataSource.rows`, {OBSERVATIONS}", ours_rows, ours_s, ours_cpu),
        row(f"`csv.reader` (tab, no quoting), {OBSERVATIONS}", csv_rows, csv_s, csv_cpu),
        row(
            f"the whole selection: 5 passes, the cap, {len(selection.photos):,} photos kept",
            scanned,
            select_s,
            select_cpu,
        ),  # fmt: skip
        "",
        f"Of the whole selection, saving the progress after passes 1-4 took "
        f"{progress.seconds:.2f} s.",
    ]
    publish(lines, args.output, "Collector scan speed: CPU", __file__)


if __name__ == "__main__":
    main()

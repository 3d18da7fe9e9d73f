"""A generated photo set with a learnable difference between classes, for demos and tests.

Each class gets its own colour and stripe direction under random noise, blobs and
brightness, saved as ~500 px JPEGs (the size of iNaturalist's "medium" photos) with a CSV
in the format `train` reads. Nothing is downloaded and nothing binary is committed.
"""

from __future__ import annotations

import argparse
import csv
import logging
from pathlib import Path

import numpy as np
from PIL import Image

DEMO_TARGETS = ("Lycorma delicatula", "Zenaida macroura", "Acer rubrum", "Erigeron canadensis")
DEMO_OTHERS = ("Acer saccharum", "Quercus alba", "Turdus migratorius")
CSV_NAME = "train.csv"

_log = logging.getLogger(__name__)


def make_demo_dataset(
    root: Path,
    photos_per_species: int = 12,
    photo_size: int = 500,
    species: tuple[str, ...] = DEMO_TARGETS + DEMO_OTHERS,
    seed: int = 0,
) -> Path:
    """Write photos under root/images/<species>/ and root/train.csv; return the CSV path."""
    rng = np.random.default_rng(seed)
    rows = []
    for index, name in enumerate(species):
        folder = root / "images" / name.replace(" ", "_")
        folder.mkdir(parents=True, exist_ok=True)
        for number in range(photos_per_species):
            path = folder / f"{number:04d}.jpg"
            Image.fromarray(_photo(index, len(species), photo_size, rng)).save(path, quality=90)
            rows.append({"species_name": name, "image_name": str(path.relative_to(root))})
    csv_path = root / CSV_NAME
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["species_name", "image_name"])
        writer.writeheader()
        writer.writerows(rows)
    return csv_path


def _photo(index: int, count: int, size: int, rng: np.random.Generator) -> np.ndarray:
    hue = index / count
    colour = np.array([np.cos(2 * np.pi * (hue + k / 3)) for k in range(3)]) * 0.5 + 0.5
    angle = np.pi * index / count
    y, x = np.mgrid[0:size, 0:size] / size
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * 6 * (x * np.cos(angle) + y * np.sin(angle)))
    image = stripes[..., None] * colour * rng.uniform(0.7, 1.0)
    for _ in range(3):
        cy, cx, radius = rng.uniform(0, 1, 2).tolist() + [rng.uniform(0.05, 0.2)]
        blob = ((y - cy) ** 2 + (x - cx) ** 2) < radius**2
        image[blob] = rng.uniform(0, 1, 3)
    image += rng.normal(0, 0.08, image.shape)
    return (np.clip(image, 0, 1) * 255).astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="folder to write (the training channel)")
    parser.add_argument("--photos-per-species", type=int, default=12)
    parser.add_argument("--photo-size", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    csv_path = make_demo_dataset(args.root, args.photos_per_species, args.photo_size, seed=args.seed)
    _log.info("demo dataset: %s", csv_path)


if __name__ == "__main__":
    main()

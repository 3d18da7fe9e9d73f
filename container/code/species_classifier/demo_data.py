"""A generated photo set with a learnable difference between classes, for demos and tests,
and stand-ins for what training would otherwise have to make first: ImageNet-like weights
and a model bundle.

Each class gets its own colour under random noise, blobs and brightness (shared, a little
moved, by the photos of one observation), saved as ~500 px JPEGs (the size of iNaturalist's "medium" photos: 500 on the long side) in turn
landscape 4:3, portrait 3:4 and square, with a CSV in the format `train` reads. Nothing is
downloaded and nothing binary is committed.
"""

from __future__ import annotations

import argparse
import csv
import logging
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

DEMO_TARGETS = ("Lycorma delicatula", "Zenaida macroura", "Acer rubrum", "Erigeron canadensis")
DEMO_OTHERS = ("Acer saccharum", "Quercus alba", "Turdus migratorius")
# The classes a model trained on the demo targets answers with.
DEMO_CLASSES = (*DEMO_TARGETS, "other")
CSV_NAME = "train.csv"
# Observers in the demo data: few enough that each photographs several observations.
OBSERVERS = 8
# (height, width) as fractions of the long side, taken in turn photo by photo.
SHAPES = {"landscape": (0.75, 1.0), "portrait": (1.0, 0.75), "square": (1.0, 1.0)}

_log = logging.getLogger(__name__)


def make_demo_dataset(
    root: Path,
    photos_per_species: int = 12,
    photo_size: int = 500,
    species: tuple[str, ...] = DEMO_TARGETS + DEMO_OTHERS,
    seed: int = 0,
    max_photos_per_observation: int = 1,
    class_colour_share: float = 1.0,
) -> Path:
    """Write photos under root/images/<species>/ and root/train.csv; return the CSV path.

    photo_size is the long side; the photos are landscape, portrait and square in turn.
    Photos come in observations of 1 to `max_photos_per_observation` photos, as on
    iNaturalist: near-copies of one individual (the same blobs, moved a little, under other
    light and noise). Each row has an `observation_uuid` and an `observer_id`, as the
    collector writes them; observers come from a small pool, so each one recurs.

    `class_colour_share` below 1 mixes the class colour with a colour of the observation's
    own (its place, its light): the species is then harder to see than the individual, as
    in real photos, and near-copies across a split flatter a score the more.
    """
    rng = np.random.default_rng(seed)
    # Ids, observation sizes and tints from their own stream: with one photo per
    # observation and the full class colour the photos are the same as before there were
    # observations.
    ids = np.random.default_rng([seed, 1])
    observers = [str(n) for n in ids.choice(9_000_000, OBSERVERS, replace=False) + 1_000_000]
    rows = []
    for index, name in enumerate(species):
        folder = root / "images" / name.replace(" ", "_")
        folder.mkdir(parents=True, exist_ok=True)
        number = 0
        while number < photos_per_species:
            size = min(
                int(ids.integers(1, max_photos_per_observation + 1)), photos_per_species - number
            )
            observation = str(uuid.UUID(bytes=ids.bytes(16), version=4))
            observer = observers[ids.integers(len(observers))]
            look = _look(rng, tint=ids.uniform(0, 1, 3))
            for copy in range(size):
                path = folder / f"{number:04d}.jpg"
                height, width = SHAPES[list(SHAPES)[number % len(SHAPES)]]
                shape = (round(height * photo_size), round(width * photo_size))
                seen = look if copy == 0 else _nudge(look, rng)
                pixels = _photo(index, len(species), shape, seen, class_colour_share, rng)
                Image.fromarray(pixels).save(path, quality=90)
                rows.append(
                    {
                        "species_name": name,
                        "image_name": str(path.relative_to(root)),
                        "observation_uuid": observation,
                        "observer_id": observer,
                    }
                )
                number += 1
    csv_path = root / CSV_NAME
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return csv_path


@dataclass(frozen=True)
class _Look:
    """What the photos of one observation share: the light, a tint (RGB), and three blobs,
    each (centre y, centre x, radius, RGB colour) in fractions of the long side."""

    brightness: float
    tint: np.ndarray
    blobs: list[tuple[float, float, float, np.ndarray]]


def _look(rng: np.random.Generator, tint: np.ndarray) -> _Look:
    brightness = rng.uniform(0.8, 1.0)
    blobs = []
    for _ in range(3):
        cy, cx = rng.uniform(0, 1, 2)
        radius = rng.uniform(0.03, 0.1)
        blobs.append((cy, cx, radius, rng.uniform(0, 1, 3)))
    return _Look(brightness, tint, blobs)


def _nudge(look: _Look, rng: np.random.Generator) -> _Look:
    """Another photo of the same individual: the blobs a little moved, the light a little other."""
    moved = [
        (cy + rng.normal(0, 0.02), cx + rng.normal(0, 0.02), radius, colour)
        for cy, cx, radius, colour in look.blobs
    ]
    return _Look(look.brightness * rng.uniform(0.95, 1.05), look.tint, moved)


def _photo(
    index: int,
    count: int,
    shape: tuple[int, int],
    look: _Look,
    class_colour_share: float,
    rng: np.random.Generator,
) -> np.ndarray:
    # The class colour dominates, so even a randomly initialised network picks it up within
    # a few epochs on a CPU; blobs and noise keep the photos from being identical and give
    # JPEG decoding as much work as a real photo of that size.
    hue = index / count
    colour = np.array([np.cos(2 * np.pi * (hue + k / 3)) for k in range(3)]) * 0.5 + 0.5
    colour = class_colour_share * colour + (1 - class_colour_share) * look.tint
    height, width = shape
    # Blob centres in fractions of each side, radii in fractions of the long side: round
    # blobs stay round whatever the photo's shape.
    y, x = np.mgrid[0:height, 0:width] / max(shape)
    image = np.ones((height, width, 3)) * colour * look.brightness
    for cy, cx, radius, blob_colour in look.blobs:
        cy, cx = np.array([cy, cx]) * np.array(shape) / max(shape)
        blob = ((y - cy) ** 2 + (x - cx) ** 2) < radius**2
        image[blob] = blob_colour
    image += rng.normal(0, 0.08, image.shape)
    return (np.clip(image, 0, 1) * 255).astype(np.uint8)


def pretrain_stand_in_weights(
    torch_home: Path, steps: int = 120, img_size: int = 32, seed: int = 1
) -> Path:
    """Stand-in for the ImageNet weights where they cannot be downloaded (tests, offline demos).

    A randomly initialised efficientnet_b1 needs hundreds of steps before its batch-norm
    statistics settle, far more than a short demo run has. This trains the full ImageNet-shaped
    network briefly (flat Adam, ~30 s on two CPU cores) on generated photos of another seed
    than the demo's, and saves it where `pretrained=true` looks for the real weights.
    """
    import torch  # imported here: writing a demo dataset needs no torch
    from torchvision.models import efficientnet_b1

    from species_classifier.augment import augment
    from species_classifier.cache import build_cache
    from species_classifier.imaging import normalize
    from species_classifier.model import pretrained_weights_path

    # Where torch.hub (and so pretrained=true) looks when TORCH_HOME is torch_home.
    target = torch_home / "hub" / "checkpoints" / pretrained_weights_path().name
    with tempfile.TemporaryDirectory() as scratch:
        make_demo_dataset(Path(scratch), photos_per_species=16, photo_size=160, seed=seed)
        files = sorted(Path(scratch).glob("images/*/*.jpg"))
        species = sorted({f.parent.name for f in files})
        labels = torch.tensor([species.index(f.parent.name) for f in files])
        cache = build_cache(files, Path(scratch), img_size, workers=0)
    pixels, sizes = torch.from_numpy(cache.pixels), torch.from_numpy(cache.sizes)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    network = efficientnet_b1()
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-3)
    network.train()
    for _ in range(steps):
        rows = torch.randint(0, len(labels), (16,), generator=generator)
        inputs = normalize(augment(pixels[rows], sizes[rows], img_size, generator))
        loss = torch.nn.functional.cross_entropy(network(inputs), labels[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(network.state_dict(), target)
    return target


def make_random_bundle(model_dir: Path, img_size: int = 64, members: int = 3) -> Path:
    """A model bundle laid out as training writes it, of the demo classes, without training:
    efficientnet_b1 members with random weights, a different seed per member."""
    import torch  # imported here: writing a demo dataset needs no torch

    from species_classifier.bundle import BundleDescription, Member, write_bundle
    from species_classifier.model import build_model

    names = [Member(f"fold-{k}", f"fold-{k}.pt") for k in range(1, members + 1)]
    state_dicts = {}
    for seed, member in enumerate(names):
        torch.manual_seed(seed)
        state_dicts[member.name] = build_model(len(DEMO_CLASSES), pretrained=False).state_dict()
    write_bundle(model_dir, BundleDescription(list(DEMO_CLASSES), img_size, names), state_dicts)
    return model_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="folder to write (the training channel)")
    parser.add_argument("--photos-per-species", type=int, default=12)
    parser.add_argument("--photo-size", type=int, default=500, help="long side, in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--max-photos-per-observation",
        type=int,
        default=3,
        help="observations have 1 to this many near-copy photos (1: every photo its own)",
    )
    parser.add_argument(
        "--stand-in-weights",
        type=Path,
        metavar="TORCH_HOME",
        help="also pretrain stand-in ImageNet weights into this TORCH_HOME (no download needed)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    csv_path = make_demo_dataset(
        args.root,
        args.photos_per_species,
        args.photo_size,
        seed=args.seed,
        max_photos_per_observation=args.max_photos_per_observation,
    )
    _log.info("demo dataset: %s", csv_path)
    if args.stand_in_weights:
        _log.info("stand-in weights: %s", pretrain_stand_in_weights(args.stand_in_weights))


if __name__ == "__main__":
    main()

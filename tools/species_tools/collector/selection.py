"""Which photos make the training channel, and how many were left out for which reason.

Five streamed passes over the metadata, each saved once finished (scan_progress), so that an
interrupted scan resumes after the last one:
1. taxa: the targets and look-alikes (active taxa of rank species, by name) and every taxon
   below one, which is labelled with its species;
2. observations: those of a kept quality grade inside `species_box` (targets, look-alikes)
   or `other_box` (anything else);
3. taxa again: the species names of the `other` observations, those identified below
   species rolled up to their species;
4. photos: the photos of the selected observations, and every photo id met twice;
5. observers: the login and name that each photo's licence asks to credit.

Then one function per rule: photos on more than one observation are dropped, licences are
filtered, each observation keeps its first `photos_per_observation` photos, and each class is
capped by a seeded choice.

Inactive taxa are left out on purpose: when iNaturalist's taxonomy changes it makes the old
taxon inactive and moves the observations to the new one; the few that linger on an inactive
taxon have no current name, so no label can be trusted.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field, replace

from species_tools.collector import CollectError
from species_tools.collector.metadata import (
    OBSERVATIONS,
    OBSERVERS,
    PHOTOS,
    TAXA,
    MetadataSource,
)
from species_tools.collector.scan_progress import ScanProgress
from species_tools.collector.settings import OTHER, Settings

_log = logging.getLogger("collect_inaturalist")

IMAGES_DIR = "images"
SPECIES = "species"
SPECIES_RANK_LEVEL = 10.0
PASSES = ("taxa", "observations", "taxa again", "photos", "observers")
# `other` species named in a summary; the plan counts every one.
LISTED_SPECIES = 20


@dataclass(frozen=True)
class Photo:
    """One selected photo and its provenance: a row of the plan and of the CSV."""

    species_name: str
    photo_id: int
    extension: str
    observation_uuid: str
    license: str
    observer_id: str
    position: int = 0
    observer_login: str = ""
    observer_name: str = ""

    @property
    def image_name(self) -> str:
        return f"{IMAGES_DIR}/{self.photo_id}.{self.extension}"

    def source_key(self, size: str) -> str:
        return f"photos/{self.photo_id}/{size}.{self.extension}"


@dataclass
class Selection:
    photos: list[Photo]
    dropped: Counter = field(default_factory=Counter)


@dataclass
class Taxonomy:
    """What the first pass over the taxa keeps: little, as the file lists every taxon."""

    chosen: dict[int, str]  # targets, look-alikes and taxa below one -> species name
    below_species: dict[int, str]  # other active taxa below species -> their ancestry
    inactive: set[int]


def select_photos(
    settings: Settings, metadata: MetadataSource, progress: ScanProgress
) -> Selection:
    """The five passes, each skipped when an interrupted scan under the same settings and
    snapshot finished it (`progress`), then the cap."""
    saved = progress.load()
    scan = Scan.from_json(saved) if saved else Scan()
    if scan.passes:
        _log.info(
            "resuming the interrupted scan after pass %d of %d (%s), saved in %s",
            scan.passes, len(PASSES), PASSES[scan.passes - 1], progress.path,
        )  # fmt: skip
    steps = (_find_taxa, _find_observations, _name_other_species, _find_photos)
    for number, step in enumerate(steps, start=1):
        if scan.passes < number:
            step(scan, settings, metadata)
            scan.passes = number
            progress.save(scan.to_json())
    photos = _attributed(metadata, scan.photos, scan.dropped)
    photos = _seeded_cap(photos, settings, scan.dropped)
    photos.sort(key=lambda p: (p.species_name, p.photo_id))
    return Selection(photos, +scan.dropped)


@dataclass
class Scan:
    """What the finished passes found (the first `passes` of PASSES), holding only what the
    passes still to come need: what an interrupted scan resumes from."""

    passes: int = 0
    dropped: Counter = field(default_factory=Counter)
    taxonomy: Taxonomy | None = None
    labels: dict[str, str] = field(default_factory=dict)  # observation -> species name
    other_taxa: dict[str, int] = field(default_factory=dict)  # observation -> taxon to name
    photos: list[Photo] = field(default_factory=list)

    def to_json(self) -> dict:
        taxonomy = self.taxonomy and {
            "chosen": self.taxonomy.chosen,
            "below_species": self.taxonomy.below_species,
            "inactive": sorted(self.taxonomy.inactive),
        }
        return {
            "passes": self.passes,
            "dropped": dict(self.dropped),
            "taxonomy": taxonomy,
            "labels": self.labels,
            "other_taxa": self.other_taxa,
            "photos": [asdict(p) for p in self.photos],
        }

    @classmethod
    def from_json(cls, saved: dict) -> Scan:
        taxonomy = saved["taxonomy"] and Taxonomy(
            {int(k): v for k, v in saved["taxonomy"]["chosen"].items()},
            {int(k): v for k, v in saved["taxonomy"]["below_species"].items()},
            set(saved["taxonomy"]["inactive"]),
        )
        photos = [Photo(**row) for row in saved["photos"]]
        return cls(
            saved["passes"], Counter(saved["dropped"]), taxonomy, saved["labels"],
            saved["other_taxa"], photos,
        )  # fmt: skip


def _find_taxa(scan: Scan, settings: Settings, metadata: MetadataSource) -> None:
    scan.taxonomy = _taxonomy(settings, metadata)


def _find_observations(scan: Scan, settings: Settings, metadata: MetadataSource) -> None:
    scan.labels, scan.other_taxa = _observations(settings, metadata, scan.taxonomy, scan.dropped)


def _name_other_species(scan: Scan, settings: Settings, metadata: MetadataSource) -> None:
    names = _species_names(metadata, set(scan.other_taxa.values()), scan.taxonomy)
    for uuid, taxon_id in scan.other_taxa.items():
        if taxon_id in names:
            scan.labels[uuid] = names[taxon_id]
        else:
            scan.dropped["observations not identified to a species"] += 1
    scan.taxonomy, scan.other_taxa = None, {}  # the passes to come need neither: not saved
    _log.info("observations selected: %s", observation_summary(scan.labels, settings))


def _find_photos(scan: Scan, settings: Settings, metadata: MetadataSource) -> None:
    candidates, shared = _scan_photos(metadata, scan.labels)
    photos = _without_shared(candidates, shared, scan.dropped)
    photos = _allowed_licences(photos, settings.licenses, scan.dropped)
    scan.photos = _first_per_observation(photos, settings.photos_per_observation, scan.dropped)
    scan.labels = {}  # the photos carry their labels now


def largest_others(per_species: Counter, settings: Settings) -> list[tuple[str, int]]:
    """The `other` species with the most photos or observations first, then by name: a wide
    box holds thousands of species, of which a summary names the first `LISTED_SPECIES`."""
    others = [(n, c) for n, c in per_species.items() if settings.group_of(n) == OTHER]
    return sorted(others, key=lambda item: (-item[1], item[0]))


def observation_summary(labels: dict[str, str], settings: Settings) -> str:
    """One short line however wide the boxes: every target and look-alike, the largest
    `other` species, and how many more."""
    per_species = Counter(labels.values())
    chosen = ", ".join(f"{n} {per_species[n]:,}" for n in settings.targets + settings.lookalikes)
    others = largest_others(per_species, settings)
    listed = ", ".join(f"{n} {c:,}" for n, c in others[:LISTED_SPECIES])
    more = len(others) - LISTED_SPECIES
    return (
        f"{len(labels):,}; {chosen}; {len(others):,} other species"
        + (f", the largest {listed}" if others else "")
        + (f" and {more:,} more" if more > 0 else "")
    )


def _taxonomy(settings: Settings, metadata: MetadataSource) -> Taxonomy:
    wanted = set(settings.targets) | set(settings.lookalikes)
    species_ids: dict[int, str] = {}
    below: dict[int, str] = {}
    inactive: set[int] = set()
    inactive_names: dict[str, int] = {}
    columns = ("taxon_id", "ancestry", "rank_level", "rank", "name", "active")
    for taxon_text, ancestry, rank_level, rank, name, active in metadata.rows(TAXA, columns):
        if not taxon_text.isdigit():
            continue
        taxon_id = int(taxon_text)
        if not _is_active(active):
            inactive.add(taxon_id)
            if rank == SPECIES and name in wanted:
                inactive_names[name] = taxon_id
        elif rank == SPECIES:
            if name in wanted:
                species_ids[taxon_id] = name
        elif _rank_level(rank_level) < SPECIES_RANK_LEVEL:
            below[taxon_id] = ancestry
    missing = sorted(wanted - set(species_ids.values()))
    if missing:
        replaced = [f"{n} (inactive: https://www.inaturalist.org/taxa/{inactive_names[n]})"
                    for n in missing if n in inactive_names]  # fmt: skip
        raise CollectError(
            f"no active taxon of rank species named {', '.join(map(repr, missing))} in "
            f"{metadata.describe(TAXA)}: check the spelling against iNaturalist's current "
            "scientific name" + (f"; replaced: {', '.join(replaced)}" if replaced else "")
        )
    chosen = dict(species_ids)
    for taxon_id, ancestry in list(below.items()):
        species = next((species_ids[a] for a in _ids(ancestry) if a in species_ids), None)
        if species is not None:
            chosen[taxon_id] = species
            del below[taxon_id]
    return Taxonomy(chosen, below, inactive)


def _is_active(text: str) -> bool:
    return text.strip().lower() == "true"


def _ids(ancestry: str) -> list[int]:
    """The taxon ids of an ancestry, `48460/1/2/355675`, root first."""
    return [int(part) for part in ancestry.split("/") if part.isdigit()]


def _rank_level(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return float("inf")


def _observations(
    settings: Settings, metadata: MetadataSource, taxonomy: Taxonomy, dropped: Counter
) -> tuple[dict[str, str], dict[str, int]]:
    """(observation -> species name for targets and look-alikes, observation -> taxon for
    the candidates of `other`): in the right box, of a kept quality grade."""
    labelled: dict[str, str] = {}
    other_taxa: dict[str, int] = {}
    grades = set(settings.quality_grades)
    columns = ("observation_uuid", "latitude", "longitude", "taxon_id", "quality_grade")
    for uuid, lat_text, lon_text, taxon_text, grade in metadata.rows(OBSERVATIONS, columns):
        if grade not in grades or not taxon_text:
            continue
        try:
            lat, lon, taxon_id = float(lat_text), float(lon_text), int(taxon_text)
        except ValueError:
            continue  # no coordinates, or a malformed row
        name = taxonomy.chosen.get(taxon_id)
        if name is not None:
            if settings.species_box.contains(lat, lon):
                labelled[uuid] = name
        elif settings.other_box.contains(lat, lon):
            if taxon_id in taxonomy.inactive:
                dropped["observations on an inactive taxon"] += 1
            else:
                other_taxa[uuid] = taxon_id
    return labelled, other_taxa


def _species_names(
    metadata: MetadataSource, taxon_ids: set[int], taxonomy: Taxonomy
) -> dict[int, str]:
    """taxon -> species name for those taxa that are a species or below an active one;
    genus-level and other coarser IDs get none."""
    ancestors = {
        t: _ids(taxonomy.below_species[t]) for t in taxon_ids if t in taxonomy.below_species
    }
    needed = taxon_ids | {a for chain in ancestors.values() for a in chain}
    species: dict[int, str] = {}
    for taxon_text, rank, name, active in metadata.rows(
        TAXA, ("taxon_id", "rank", "name", "active")
    ):
        is_species = rank == SPECIES and _is_active(active) and taxon_text.isdigit()
        if is_species and int(taxon_text) in needed:
            species[int(taxon_text)] = name
    names = {t: species[t] for t in taxon_ids if t in species}
    for taxon_id, chain in ancestors.items():
        # Nearest ancestor first: a form under a variety under a species is that species.
        name = next((species[a] for a in reversed(chain) if a in species), None)
        if name is not None:
            names[taxon_id] = name
    return names


class _SeenIds:
    """One bit per photo id (under 100 MB for today's ids): which ids were met before."""

    def __init__(self) -> None:
        self.bits = bytearray(1 << 20)

    def add(self, photo_id: int) -> bool:
        """Mark the id; True when it was marked already."""
        byte, bit = photo_id >> 3, 1 << (photo_id & 7)
        if byte >= len(self.bits):
            self.bits.extend(bytes(byte + 1 - len(self.bits) + len(self.bits) // 4))
        seen = bool(self.bits[byte] & bit)
        self.bits[byte] |= bit
        return seen


def _scan_photos(metadata: MetadataSource, labels: dict[str, str]) -> tuple[list[Photo], set[int]]:
    """(the photos of the selected observations, every photo id met more than once): a photo
    met twice belongs to several observations, even when the other one was not selected."""
    seen = _SeenIds()
    shared: set[int] = set()
    candidates: list[Photo] = []
    columns = ("photo_id", "observation_uuid", "observer_id", "extension", "license", "position")
    for photo_text, uuid, observer_id, extension, license_code, position in metadata.rows(
        PHOTOS, columns
    ):
        if not photo_text.isdigit():
            continue
        photo_id = int(photo_text)
        if seen.add(photo_id):
            shared.add(photo_id)
        species = labels.get(uuid)
        if species is not None:
            order = int(position) if position.isdigit() else 0
            candidates.append(
                Photo(species, photo_id, extension, uuid, license_code, observer_id, order)
            )
    return candidates, shared


def _without_shared(photos: list[Photo], shared: set[int], dropped: Counter) -> list[Photo]:
    """Photos attached to one observation only: the same photo under two labels (or twice in
    one class) would teach nothing and leak between folds."""
    kept = [p for p in photos if p.photo_id not in shared]
    dropped["on more than one observation"] += len(photos) - len(kept)
    return kept


def _allowed_licences(
    photos: list[Photo], licenses: tuple[str, ...], dropped: Counter
) -> list[Photo]:
    if not licenses:
        return photos
    kept = [p for p in photos if p.license.upper() in licenses]
    dropped["licence not allowed"] += len(photos) - len(kept)
    return kept


def _first_per_observation(photos: list[Photo], limit: int, dropped: Counter) -> list[Photo]:
    """The first `limit` photos of each observation by position (0: all of them): several
    photos of one organism would land in different folds and flatter the scores."""
    if not limit:
        return photos
    by_observation: dict[str, list[Photo]] = defaultdict(list)
    for photo in photos:
        by_observation[photo.observation_uuid].append(photo)
    kept: list[Photo] = []
    for members in by_observation.values():
        members.sort(key=lambda p: (p.position, p.photo_id))
        kept.extend(members[:limit])
    dropped["beyond photos_per_observation"] += len(photos) - len(kept)
    return kept


def _attributed(metadata: MetadataSource, photos: list[Photo], dropped: Counter) -> list[Photo]:
    """The photos with their observer's login and name, which every CC-BY licence asks to
    credit; a photo whose observer is not in observers.csv.gz cannot be credited."""
    wanted = {p.observer_id for p in photos}
    observers: dict[str, tuple[str, str]] = {}
    for observer_id, login, name in metadata.rows(OBSERVERS, ("observer_id", "login", "name")):
        if observer_id in wanted:
            observers[observer_id] = (login, name)
    kept = [
        replace(p, observer_login=observers[p.observer_id][0],
                observer_name=observers[p.observer_id][1])
        for p in photos
        if p.observer_id in observers
    ]  # fmt: skip
    dropped["observer not in observers.csv.gz"] += len(photos) - len(kept)
    return kept


def _seeded_cap(photos: list[Photo], settings: Settings, dropped: Counter) -> list[Photo]:
    """At most the cap of each group, chosen by a seeded hash of the photo id, not the file
    order: the choice does not depend on how a snapshot is sorted, and a later one mostly
    agrees."""
    groups: dict[str, list[Photo]] = defaultdict(list)
    for photo in photos:
        groups[settings.group_of(photo.species_name)].append(photo)
    kept: list[Photo] = []
    for group, members in groups.items():
        members.sort(
            key=lambda p: hashlib.sha256(f"{settings.seed}:{p.photo_id}".encode()).digest()
        )
        cap = settings.cap_for(group) or len(members)
        if len(members) > cap:
            dropped[f"over the cap of {group}"] += len(members) - cap
        kept.extend(members[:cap])
    return kept

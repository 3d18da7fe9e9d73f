"""`species-classify`: the trained model on a laptop, offline, without torch.

    species-classify --model DIR_OR_model.tar.gz PHOTO...

prints one JSON answer per photo, in order, with the fields and values `/invocations` gives
(answers.py builds both), from the bundle's model.onnx in ONNX Runtime. Photos are decoded
by imaging.py, the server's own decoder. Needs onnxruntime, Pillow and numpy only
(`pip install .[classify]`): nothing here imports torch. A photo that cannot be used gets
`{"error": ...}` on its line, as /invocations answers it, and the exit status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from species_classifier.answers import build_answers
from species_classifier.imaging import PhotoError, decode_photo
from species_classifier.onnx_runtime import INPUT, MEMBERS_OUTPUT, ONNX_FILE, open_session

DESCRIPTION_FILE = "model.json"
# Photos decoded and run at a time: ONNX Runtime's time per photo stops falling after a
# handful on a laptop's CPU, and memory stays small for a folder of thousands.
BATCH = 8
EXIT_PHOTO_ERROR = 1
EXIT_MODEL_ERROR = 2


class ModelError(ValueError):
    """The --model path does not hold a bundle with a checked model.onnx."""


class OfflineClassifier:
    """A bundle's model.onnx and model.json, ready to answer decoded photos."""

    def __init__(self, model_dir: Path, threads: int | None = None) -> None:
        path = model_dir / DESCRIPTION_FILE
        try:
            description = json.loads(path.read_text())
        except FileNotFoundError:
            raise ModelError(
                f"no {DESCRIPTION_FILE} in {model_dir}: point --model at the model folder or "
                "the model.tar.gz that training wrote"
            ) from None
        except ValueError as error:
            raise ModelError(f"{path} is not valid JSON: {error}") from None
        if not description.get("onnx") or not (model_dir / ONNX_FILE).is_file():
            raise ModelError(
                f"{model_dir} has no checked {ONNX_FILE}: the export failed when it was trained "
                "(the training log says why) or it was trained before ONNX export; serve it "
                "with the image instead"
            )
        try:
            self.classes = list(description["classes"])
            self.img_size = int(description["img_size"])
            self.member_names = [member["name"] for member in description["members"]]
        except (KeyError, TypeError, ValueError) as error:
            raise ModelError(f"{path} is not a valid model description: {error!r}") from None
        self.abstain_below = description.get("abstain_below")
        self.session = open_session(model_dir / ONNX_FILE, threads or os.cpu_count() or 1)

    def answer(self, photos: list[np.ndarray]) -> list[dict]:
        (member_probs,) = self.session.run([MEMBERS_OUTPUT], {INPUT: np.stack(photos)})
        return build_answers(member_probs, self.classes, self.member_names, self.abstain_below)

    def classify(self, paths: list[Path]) -> Iterator[dict]:
        """One answer per photo, in order: the /invocations answer, or {"error": ...}."""
        for start in range(0, len(paths), BATCH):
            decoded: list[np.ndarray | str] = []
            for path in paths[start : start + BATCH]:
                try:
                    decoded.append(decode_photo(path, self.img_size))
                except PhotoError as error:
                    decoded.append(f"cannot use the photo {path}: {error}")
            photos = [item for item in decoded if isinstance(item, np.ndarray)]
            answers = iter(self.answer(photos) if photos else [])
            for item in decoded:
                yield next(answers) if isinstance(item, np.ndarray) else {"error": item}


@contextmanager
def unpacked(model: Path) -> Iterator[Path]:
    """The bundle folder: `model` itself, or model.json and model.onnx unpacked from a
    model.tar.gz into a temporary folder (the weights files are not needed)."""
    if model.is_dir():
        yield model
        return
    if not model.is_file():
        raise ModelError(f"{model} does not exist: give the model folder or model.tar.gz")
    with tempfile.TemporaryDirectory() as folder:
        try:
            with tarfile.open(model) as archive:
                wanted = [
                    member
                    for member in archive.getmembers()
                    if member.isfile() and Path(member.name).name in (DESCRIPTION_FILE, ONNX_FILE)
                ]
                for member in wanted:
                    member.name = Path(member.name).name
                archive.extractall(folder, members=wanted, filter="data")
        except (tarfile.TarError, OSError) as error:
            detail = str(error).splitlines()[0].rstrip(":") if str(error) else type(error).__name__
            raise ModelError(
                f"{model} is neither a model folder nor a readable model.tar.gz ({detail})"
            ) from None
        yield Path(folder)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="species-classify",
        description="Tell the species in photos with a trained model, offline (ONNX Runtime).",
    )
    parser.add_argument(
        "--model", type=Path, required=True, help="the model folder or model.tar.gz"
    )
    parser.add_argument("--threads", type=int, help="CPU threads (default: every core)")
    parser.add_argument("photos", type=Path, nargs="+", metavar="PHOTO")
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads {args.threads}: give 1 or more, or leave it out for every core")
    failed = False
    try:
        with unpacked(args.model) as model_dir:
            classifier = OfflineClassifier(model_dir, args.threads)
            for answer in classifier.classify(args.photos):
                failed |= "error" in answer
                sys.stdout.write(json.dumps(answer) + "\n")
                sys.stdout.flush()
    except ModelError as error:
        sys.stderr.write(f"species-classify: {error}\n")
        return EXIT_MODEL_ERROR
    return EXIT_PHOTO_ERROR if failed else 0


if __name__ == "__main__":
    sys.exit(main())

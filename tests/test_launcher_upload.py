"""The launcher's `upload`: a local channel to a content-addressed prefix, and the container's CSV rule.

Against a local AWS: see launcher_helpers for how and for the gaps of moto it bridges.
"""

from __future__ import annotations

import pytest
from launcher_helpers import (
    BUCKET,
    CREATES,
    Wire,
    keys_under,
    make_channel,
    train_args,
    uploaded_prefix,
)


def test_two_folders_with_one_name_never_share_a_prefix(run, aws, tmp_path):
    first = make_channel(tmp_path / "first" / "training")
    second = make_channel(tmp_path / "second" / "training")
    (second / "labels.csv").rename(second / "species.csv")
    (second / "images" / "d.jpg").write_bytes(b"\xff\xd8 photo d")
    prefixes = []
    for job, folder in (("sc-same-name-1", first), ("sc-same-name-2", second)):
        code, out, err = run(*train_args(job, data=folder))
        assert code == 0, err
        prefixes.append(uploaded_prefix(out))

    assert prefixes[0] != prefixes[1]
    assert keys_under(aws.s3, prefixes[0]) == {"labels.csv", "images/a.jpg", "images/b.jpg",
                                               "images/c.png"}  # fmt: skip
    assert keys_under(aws.s3, prefixes[1]) == {"species.csv", "images/a.jpg", "images/b.jpg",
                                               "images/c.png", "images/d.jpg"}  # fmt: skip


def test_an_upload_prefix_holding_other_objects_is_refused(run, aws, tmp_path):
    data = make_channel(tmp_path / "training")
    aws.s3.put_object(Bucket=BUCKET, Key="species-classifier/shared/old.csv", Body=b"a,b\n")
    wire = Wire()

    code, _, err = run(
        *train_args(
            "sc-stale", "--upload-to", f"s3://{BUCKET}/species-classifier/shared", data=data
        ),
        wire=wire,
    )

    assert code == 2
    [line] = err.strip().splitlines()
    assert f"s3://{BUCKET}/species-classifier/shared/ already holds 1 objects" in line
    assert "species-classifier/shared/old.csv" in line
    assert not set(wire.operations()) & set(CREATES)


@pytest.mark.parametrize(
    ("layout", "hyperparameters", "message"),
    [
        ({"images/labels.csv": "species_name,image_name\n"}, [], "no CSV in the training channel"),
        ({"a.csv": "x", "b.csv": "y"}, [], "several CSVs in the training channel (a.csv, b.csv)"),
        ({"a.csv": "x"}, ["--hyperparameter", "csv_file=b.csv"], "csv_file='b.csv' is not in"),
    ],
)
def test_the_channel_csv_rule_is_the_containers(run, tmp_path, layout, hyperparameters, message):
    folder = tmp_path / "training"
    for name, text in layout.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    wire = Wire()

    code, _, err = run(*train_args("sc-csv", *hyperparameters, data=folder), wire=wire)

    assert code == 2
    [line] = err.strip().splitlines()
    assert message in line and line.startswith(f"error: --data {folder}:"), line
    assert wire.operations() == []

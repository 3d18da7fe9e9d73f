"""CSV to labels and folds: the seed's method, and a specific error for each bad input."""

import numpy as np
import pytest
from species_classifier import holdout
from species_classifier.contract.channel import find_csv
from species_classifier.contract.hyperparameters import ConfigError, parse_hyperparameters
from species_classifier.dataset import (
    CsvRows,
    DatasetError,
    check_class_sizes,
    label_photos,
    make_folds,
    read_rows,
)


def write_csv(path, text):
    path.write_text(text)
    return path


def rows_for(counts: dict[str, int]) -> CsvRows:
    return CsvRows([(name, f"{name}/{i}.jpg") for name, n in counts.items() for i in range(n)])


def test_targets_keep_their_names_and_the_rest_is_other_in_sorted_order(tmp_path):
    rows = rows_for(
        {"Zenaida macroura": 3, "Acer rubrum": 2, "Quercus alba": 4, "Acer saccharum": 1}
    )
    photos = label_photos(rows, tmp_path, ("Zenaida macroura", "Acer rubrum"), False, 0.5, 42)
    assert photos.classes == ["Acer rubrum", "Zenaida macroura", "other"]
    assert photos.class_counts() == {"Acer rubrum": 2, "Zenaida macroura": 3, "other": 5}
    assert photos.paths[0] == tmp_path / "Zenaida macroura/0.jpg"


def test_downsampling_keeps_a_seeded_fraction_of_other_only(tmp_path):
    rows = rows_for({"A": 10, "B": 40})
    first = label_photos(rows, tmp_path, ("A",), True, 0.25, 7)
    again = label_photos(rows, tmp_path, ("A",), True, 0.25, 7)
    assert first.class_counts() == {"A": 10, "other": 10}
    assert first.paths == again.paths


def test_missing_target_names_the_closest_species(tmp_path):
    rows = rows_for({"Acer rubrum": 3, "Acer saccharum": 3})
    with pytest.raises(
        DatasetError, match=r"'Acer rubra' does not occur.*'Acer rubrum' \(3 photos\)"
    ):
        label_photos(rows, tmp_path, ("Acer rubra",), False, 0.5, 42)


def test_missing_columns_and_blank_cells(tmp_path):
    bad_header = write_csv(tmp_path / "a.csv", "species,image_name\nA,x.jpg\n")
    with pytest.raises(DatasetError, match="lacks the column.*species_name.*it has"):
        read_rows(bad_header)
    blanks = write_csv(tmp_path / "b.csv", "species_name,image_name\nA,x.jpg\n,y.jpg\nB,\n")
    with pytest.raises(DatasetError, match=r"2 row\(s\) with an empty.*lines 3, 4"):
        read_rows(blanks)
    bom = write_csv(tmp_path / "c.csv", "\ufeffspecies_name , image_name\n A , x.jpg \n")
    assert read_rows(bom).rows == [("A", "x.jpg")]


def test_byte_order_marks_and_windows_encodings_read_alike(tmp_path):
    text = "species_name,image_name\nÉrable rouge,photos/érable.jpg\n"
    expected = [("Érable rouge", "photos/érable.jpg")]
    for name, encoded in {
        "utf8.csv": text.encode("utf-8"),
        "utf8-bom.csv": text.encode("utf-8-sig"),
        "utf16.csv": text.encode("utf-16"),
        "excel-windows.csv": text.encode("cp1252"),
    }.items():
        path = tmp_path / name
        path.write_bytes(encoded)
        assert read_rows(path).rows == expected, name
    undecodable = tmp_path / "binary.csv"
    undecodable.write_bytes(b"species_name,image_name\n\xff\x81,x.jpg\n")
    with pytest.raises(DatasetError, match=r"binary.csv is not UTF-8 text.*save it as CSV UTF-8"):
        read_rows(undecodable)


def test_quoted_values_may_hold_commas_quotes_and_look_like_missing_values(tmp_path):
    path = write_csv(
        tmp_path / "quoted.csv",
        'id,species_name,image_name\n1,"Acer rubrum, red maple", "a,b.jpg"\n'
        '2,"The ""NA"" moth",NA\n3,None,null.jpg\n',
    )
    assert read_rows(path).rows == [
        ("Acer rubrum, red maple", "a,b.jpg"),
        ('The "NA" moth', "NA"),
        ("None", "null.jpg"),
    ]


def test_a_malformed_row_is_named_by_its_line(tmp_path):
    extra_comma = write_csv(
        tmp_path / "a.csv", "species_name,image_name\nA,x.jpg\n\nAcer rubrum, red maple,y.jpg\n"
    )
    with pytest.raises(
        DatasetError,
        match=r"a.csv is not a well-formed CSV: line 4 has 3 fields where the header has 2: "
        r"put values that contain commas in double quotes",
    ):
        read_rows(extra_comma)
    open_quote = write_csv(tmp_path / "b.csv", 'species_name,image_name\nA,x.jpg\nB,"y.jpg\nC,z\n')
    with pytest.raises(DatasetError, match=r"the double quote opened on line 3 is never closed"):
        read_rows(open_quote)
    empty = write_csv(tmp_path / "c.csv", "")
    with pytest.raises(DatasetError, match=r"c.csv lacks the column\(s\).*it has no header"):
        read_rows(empty)
    header_only = write_csv(tmp_path / "d.csv", "species_name,image_name\n")
    with pytest.raises(DatasetError, match="d.csv has no data rows"):
        read_rows(header_only)


def test_csv_discovery(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        find_csv(tmp_path / "missing", None)
    with pytest.raises(DatasetError, match="no CSV"):
        find_csv(tmp_path, None)
    write_csv(tmp_path / "one.csv", "")
    assert find_csv(tmp_path, None).name == "one.csv"
    write_csv(tmp_path / "two.csv", "")
    with pytest.raises(DatasetError, match=r"several CSVs.*one.csv, two.csv.*csv_file"):
        find_csv(tmp_path, None)
    assert find_csv(tmp_path, "two.csv").name == "two.csv"
    with pytest.raises(DatasetError, match="csv_file='nope.csv' is not in"):
        find_csv(tmp_path, "nope.csv")


def test_too_few_photos_for_the_folds_gives_the_counts(tmp_path):
    photos = label_photos(rows_for({"A": 2, "B": 9}), tmp_path, ("A",), False, 0.5, 42)
    check_class_sizes(photos, k_folds=2)
    with pytest.raises(DatasetError, match=r"k_folds=3.*'A' has 2.*at least 3"):
        check_class_sizes(photos, k_folds=3)
    with pytest.raises(DatasetError, match=r"after leaving out 4 unreadable"):
        check_class_sizes(photos, k_folds=3, unreadable=4)


def test_holdout_needs_every_class_on_both_sides(tmp_path):
    photos = label_photos(
        rows_for({"A": 2, "B": 2, "C": 2, "D": 2}), tmp_path, ("A", "B", "C"), False, 0.5, 1
    )
    with pytest.raises(
        DatasetError,
        match=r"8 photos are too few for the 70/30 validation split.*of 4 classes.*at least 14",
    ):
        check_class_sizes(photos, k_folds=1)
    check_class_sizes(photos, k_folds=2)
    enough = label_photos(
        rows_for({"A": 4, "B": 4, "C": 4, "D": 2}), tmp_path, ("A", "B", "C"), False, 0.5, 1
    )
    check_class_sizes(enough, k_folds=1)
    make_folds(enough.labels, 1, seed=1)


def test_folds_are_stratified_disjoint_and_seeded():
    labels = np.array([0] * 30 + [1] * 12 + [2] * 9)
    folds = make_folds(labels, 3, seed=42)
    assert len(folds) == 3
    validation = np.concatenate([val for _, val in folds])
    assert sorted(validation.tolist()) == list(range(len(labels)))
    for train, val in folds:
        assert not set(train) & set(val)
        assert np.bincount(labels[val]).tolist() == [10, 4, 3]
    again = make_folds(labels, 3, seed=42)
    assert all((a[1] == b[1]).all() for a, b in zip(folds, again, strict=True))


def test_one_fold_is_a_stratified_70_30_validation_split():
    labels = np.array([0] * 70 + [1] * 30)
    [(train, val)] = make_folds(labels, 1, seed=1)
    assert len(val) == 30 and len(train) == 70
    assert np.bincount(labels[val]).tolist() == [21, 9]


def grouped_csv(path, observations_per_species: dict[str, int], seed: int = 0):
    """A CSV as the collector writes it: 1-4 photos per observation, 12 observers who each
    photograph several species."""
    rng = np.random.default_rng(seed)
    lines = ["species_name,image_name,observation_uuid,observer_id"]
    for name, observations in observations_per_species.items():
        for observation in range(observations):
            observer = rng.integers(12)
            for photo in range(rng.integers(1, 5)):
                lines.append(
                    f"{name},{name}/{observation}-{photo}.jpg,{name}-{observation},u{observer}"
                )
    return write_csv(path, "\n".join(lines) + "\n")


def test_group_by_auto_is_observation_where_the_csv_has_the_column(tmp_path):
    grouped = read_rows(grouped_csv(tmp_path / "g.csv", {"A": 2}), "auto")
    assert grouped.group_by == "observation"
    assert grouped.groups[0] == "A-0" and len(grouped.groups) == len(grouped.rows)
    assert read_rows(tmp_path / "g.csv", "observer").groups[0].startswith("u")
    assert read_rows(tmp_path / "g.csv", "none").groups is None
    plain = write_csv(tmp_path / "plain.csv", "species_name,image_name\nA,x.jpg\n")
    assert read_rows(plain, "auto").group_by == "none"
    with pytest.raises(DatasetError, match=r"group_by=observer needs the column observer_id"):
        read_rows(plain, "observer")


def test_a_photo_without_a_group_id_is_a_group_of_its_own(tmp_path):
    path = write_csv(
        tmp_path / "blank.csv",
        "species_name,image_name,observation_uuid\nA,a.jpg,o1\nA,b.jpg,\nA,c.jpg, \nA,d.jpg,o1\n",
    )
    groups = read_rows(path, "observation").groups
    assert groups[0] == groups[3] == "o1" and len(set(groups)) == 3


def group_names(photos) -> np.ndarray:
    """Each photo's group, comparable across subsets: its group id, or its own path."""
    return photos.groups if photos.groups is not None else np.array(list(map(str, photos.paths)))


@pytest.mark.parametrize("group_by", ["observation", "observer", "none"])
def test_no_group_is_in_two_folds_or_in_both_the_folds_and_the_holdout(tmp_path, group_by):
    csv_path = grouped_csv(tmp_path / "g.csv", {"A": 12, "B": 15, "C": 30, "D": 20})
    photos = label_photos(read_rows(csv_path, group_by), tmp_path, ("A", "B"), False, 0.5, 3)
    kept, held = holdout.set_aside(photos, 0.2, seed=3)
    assert set(group_names(kept)).isdisjoint(group_names(held))
    assert min(held.class_counts().values()) >= 1
    for k_folds in (3, 1):
        for train, val in make_folds(kept.labels, k_folds, seed=3, groups=kept.groups):
            assert set(group_names(kept)[train]).isdisjoint(group_names(kept)[val])
            assert set(kept.labels[val]) == set(kept.labels[train]) == {0, 1, 2}
    validated = np.concatenate([val for _, val in make_folds(kept.labels, 3, 3, kept.groups)])
    assert sorted(validated) == list(range(len(kept.labels)))
    if group_by != "none":
        # The groups are real: photos share them, so a photo-by-photo split would cut them.
        assert len(set(group_names(photos))) < len(photos.labels)


def test_grouped_splits_stay_close_to_the_asked_share():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 2000)
    groups = np.repeat(np.arange(700), 3)[:2000]  # observations of three photos
    labels = labels[groups]  # one species per observation
    kept, held = make_folds(labels, 1, seed=0, groups=groups)[0]
    for k in range(3):
        share = (labels[held] == k).sum() / (labels == k).sum()
        assert share == pytest.approx(0.3, abs=0.01)


def test_too_few_groups_for_the_folds_is_a_one_line_error(tmp_path):
    csv_path = grouped_csv(tmp_path / "g.csv", {"A": 2, "B": 9}, seed=1)
    photos = label_photos(read_rows(csv_path, "observation"), tmp_path, ("A",), False, 0.5, 42)
    assert photos.class_counts()["A"] >= 3  # enough photos, too few observations
    with pytest.raises(DatasetError) as error:
        check_class_sizes(photos, k_folds=3)
    assert str(error.value).startswith(
        "too few observations for k_folds=3: 'A' has 2; each class needs at least 3. "
        "No observation is ever split, so add observations of those classes"
    )
    assert "\n" not in str(error.value)
    check_class_sizes(photos, k_folds=2)


def test_group_by_is_a_hyperparameter_auto_by_default():
    assert parse_hyperparameters({"target_species": "a"}).group_by == "auto"
    assert parse_hyperparameters({"target_species": "a", "group-by": "Observer"}).group_by == (
        "observer"
    )
    with pytest.raises(ConfigError, match="group_by='photo' is not one of auto, observation"):
        parse_hyperparameters({"target_species": "a", "group_by": "photo"})

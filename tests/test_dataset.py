"""CSV to labels and folds: the seed's method, and a specific error for each bad input."""

import numpy as np
import pytest
from species_classifier.contract.channel import find_csv
from species_classifier.dataset import (
    DatasetError,
    check_class_sizes,
    label_photos,
    make_folds,
    read_rows,
)


def write_csv(path, text):
    path.write_text(text)
    return path


def rows_for(counts: dict[str, int]) -> list[tuple[str, str]]:
    return [(name, f"{name}/{i}.jpg") for name, n in counts.items() for i in range(n)]


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
    assert read_rows(bom) == [("A", "x.jpg")]


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
        assert read_rows(path) == expected, name
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
    assert read_rows(path) == [
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
        match=r"8 photos are too few for the 70/30 hold-out.*of 4 classes.*at least 14",
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


def test_one_fold_is_a_stratified_70_30_holdout():
    labels = np.array([0] * 70 + [1] * 30)
    [(train, val)] = make_folds(labels, 1, seed=1)
    assert len(val) == 30 and len(train) == 70
    assert np.bincount(labels[val]).tolist() == [21, 9]

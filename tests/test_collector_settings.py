"""The collector's settings (settings.py): flags over a TOML file, each mistake named in one
line that says how to fix it.
"""

from __future__ import annotations

import re

import pytest
from collector_helpers import LOOKALIKES, REPO, TARGETS, run_cli, write_config
from species_tools.aws import SettingsError
from species_tools.collector.settings import Box, load_settings


def test_missing_settings_fail_with_one_line_naming_them():
    result = run_cli("--targets", "Acer rubrum")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "missing settings: dest, species_box, other_box" in lines[0]
    assert "--species-box" in lines[0] and "collect_inaturalist.example.toml" in lines[0]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--species-box", "39,38,-79,-75"], "species_box = '39,38,-79,-75' is not a box"),
        (["--quality-grades", "good"], "quality grade(s) ['good'] unknown"),
        (["--cap", "Quercus alba=3"], "caps for Quercus alba: not a target, look-alike or 'other'"),
        (["--targets", "Acer rubrum,other"], "'other' is not a species"),
        (["--max-missing-percent", "120"], "max_missing_percent = 120.0 is not a percentage"),
    ],
)
def test_bad_settings_say_what_is_wrong(tmp_path, flags, message):
    config = write_config(tmp_path / "c.toml", "out")
    with pytest.raises(SettingsError, match="^" + re.escape(message)):
        load_settings(["--config", str(config), *flags])


def test_flags_win_over_the_config_even_when_zero(tmp_path):
    config = write_config(tmp_path / "c.toml", "out", max_per_class=50, seed=7)
    settings = load_settings(["--config", str(config), "--max-per-class", "0"])
    assert settings.max_per_class == 0 and settings.seed == 7
    assert settings.cap_for("other") == 0 and settings.cap_for("Lycorma delicatula") == 4


def test_example_config_holds_the_seed_choice():
    example = REPO / "scripts" / "collect_inaturalist.example.toml"
    settings = load_settings(["--config", str(example), "--dest", "out"])
    assert list(settings.targets) == TARGETS and list(settings.lookalikes) == LOOKALIKES
    assert settings.species_box == Box(37.911717, 39.723043, -79.487651, -75.048939)
    assert settings.other_box == Box(39.19, 39.37, -76.71, -76.52)
    assert settings.quality_grades == ("research",) and settings.photo_size == "medium"
    assert settings.max_missing_percent == 1.0


def test_a_setting_added_at_the_end_of_the_example_is_that_setting(tmp_path):
    example = (REPO / "scripts" / "collect_inaturalist.example.toml").read_text()
    config = tmp_path / "c.toml"
    config.write_text(example + "workers = 8\n")
    settings = load_settings(["--config", str(config), "--dest", "out"])
    assert settings.workers == 8
    assert settings.caps == {
        "Acer saccharum": 300, "Acer saccharinum": 300, "Acer platanoides": 300, "other": 3000,
    }  # fmt: skip


def test_a_setting_below_a_caps_table_is_refused_in_one_line(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text(
        'targets = ["Acer rubrum"]\nspecies_box = "38,39,-79,-75"\nother_box = "38,39,-79,-75"\n'
        "[caps]\nother = 30\nworkers = 8\nseed = 3\n"
    )
    result = run_cli("--config", str(config), "--dest", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert "seed, workers is inside the [caps] table" in result.stderr
    assert "move it above [caps]" in result.stderr
    assert not (tmp_path / "out").exists()


def test_caps_that_are_not_a_table_are_refused(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text("caps = 30\n")
    with pytest.raises(SettingsError, match=r"caps = 30 is not a table of NAME = N"):
        load_settings(["--config", str(config)])

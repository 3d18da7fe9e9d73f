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

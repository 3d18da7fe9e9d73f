"""Which photos are selected (selection.py), against the hand-counted open data of
collector_helpers.
"""

from __future__ import annotations

import pytest
from collector_helpers import edited_metadata, write_config
from species_tools.collector import CollectError, cli
from species_tools.collector.settings import load_settings


def test_a_target_known_only_as_an_inactive_taxon_is_named(collector_s3, tmp_path):
    folder = edited_metadata(
        collector_s3["metadata_dir"], tmp_path / "metadata", "taxa.csv.gz",
        b"Acer rubrum\ttrue", b"Acer rubrum\tfalse",
    )  # fmt: skip
    settings = load_settings(
        ["--config", str(write_config(tmp_path / "c.toml", str(tmp_path / "out"))),
         "--metadata-dir", str(folder)]
    )  # fmt: skip
    with pytest.raises(CollectError, match="no active taxon of rank species named 'Acer rubrum'"):
        cli.run(settings, *cli.make_clients(settings))

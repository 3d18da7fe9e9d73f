"""Hyperparameters as SageMaker delivers them: strings, JSON-quoted strings, decoded values."""

import dataclasses
import json
import typing

import pytest
from species_classifier.contract.hyperparameters import (
    ConfigError,
    TrainingConfig,
    convert,
    parse_hyperparameters,
)
from species_classifier.contract.preflight import as_sagemaker_delivers

FIELD_NAMES = [field.name for field in dataclasses.fields(TrainingConfig)]


def test_defaults_are_the_seeds():
    config = parse_hyperparameters({"target_species": "A b,C d"})
    assert config == TrainingConfig(target_species=("A b", "C d"))
    assert (config.img_size, config.batch_size, config.k_folds, config.num_epochs) == (
        240,
        64,
        3,
        20,
    )
    assert (config.learning_rate, config.epoch_patience, config.seed) == (1e-4, 5, 42)
    assert config.pretrained is True and config.downsample_other is False


def test_plain_and_sdk_quoted_strings_parse_alike():
    plain = {
        "target_species": "A b, C d",
        "k-folds": "5",
        "learning_rate": "0.001",
        "downsample_other": "true",
        "downsample_frac": "0.25",
        "pretrained": "False",
    }
    quoted = {key: json.dumps(value) for key, value in plain.items()}
    for raw in (plain, as_sagemaker_delivers(plain), as_sagemaker_delivers(quoted)):
        config = parse_hyperparameters(raw)
        assert config.target_species == ("A b", "C d")
        assert config.k_folds == 5 and config.learning_rate == 0.001
        assert config.downsample_other is True and config.downsample_frac == 0.25
        assert config.pretrained is False


def test_unknown_and_sagemaker_keys_are_ignored(caplog):
    config = parse_hyperparameters(
        {
            "target_species": "A",
            "_tuning_objective_metric": "validation:macro_f1",
            "sagemaker_region": "us-east-1",
            "made_up": "1",
            "lerning_rate": "0.01",
        }
    )
    assert config.target_species == ("A",) and config.learning_rate == 1e-4
    # The image trains on (the SageMaker SDK may pass keys of its own), but says what it
    # ignored, with the near miss; SageMaker's own keys are not worth a warning.
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [
        "ignoring unknown hyperparameter 'made_up': known: " + ", ".join(FIELD_NAMES),
        "ignoring unknown hyperparameter 'lerning_rate': did you mean learning_rate?",
    ]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({}, "target_species is required"),
        ({"target_species": " , "}, "target_species is required"),
        ({"target_species": "A,other"}, "must not contain 'other'"),
        ({"target_species": "A", "k_folds": "three"}, "k_folds='three' is not a number"),
        ({"target_species": "A", "k_folds": "2.5"}, "not a whole number"),
        ({"target_species": "A", "k_folds": 0}, "out of range: allowed 1 to 20"),
        ({"target_species": "A", "img_size": "9999"}, "allowed 32 to 1024"),
        ({"target_species": "A", "learning_rate": "nan"}, "not a finite number"),
        ({"target_species": "A", "pretrained": "maybe"}, "use true or false"),
        ({"target_species": "A", "precision": "fp8"}, "not one of auto, bf16, fp16, fp32"),
        ({"target_species": "A", "batch_size": True}, "not a number"),
    ],
)
def test_bad_values_name_what_is_allowed(raw, message):
    with pytest.raises(ConfigError, match=message):
        parse_hyperparameters(raw)


@pytest.mark.parametrize(
    ("value", "expected"), [("12", 12), (12, 12), ("", None), (None, None), (" 3 ", 3)]
)
def test_an_optional_whole_number_parses_as_a_number(value, expected):
    # No field is `int | None` today: the parser dispatches on the real type, so a new one
    # gets a number, not the string "12".
    assert convert("max_photos", int | None, value) == expected


@pytest.mark.parametrize(
    ("annotation", "value", "message"),
    [
        (int | None, "twelve", "max_photos='twelve' is not a number"),
        (int | None, "1.5", "not a whole number"),
        (float | None, "inf", "not a finite number"),
        (bool | None, "maybe", "use true or false"),
    ],
)
def test_an_optional_field_refuses_what_its_type_refuses(annotation, value, message):
    with pytest.raises(ConfigError, match=message):
        convert("max_photos", annotation, value)


def test_every_field_has_a_parser():
    for field in dataclasses.fields(TrainingConfig):
        if field.name != "target_species":
            convert(field.name, typing.get_type_hints(TrainingConfig)[field.name], field.default)

"""Hyperparameters as SageMaker delivers them: strings, JSON-quoted strings, decoded values."""

import json

import pytest
from species_classifier.contract.hyperparameters import (
    ConfigError,
    TrainingConfig,
    parse_hyperparameters,
)


def decoded(raw: dict[str, str]) -> dict:
    """What the sagemaker-training toolkit hands over: json.loads where it parses."""
    out = {}
    for key, value in raw.items():
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


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
    for raw in (plain, decoded(plain), decoded(quoted)):
        config = parse_hyperparameters(raw)
        assert config.target_species == ("A b", "C d")
        assert config.k_folds == 5 and config.learning_rate == 0.001
        assert config.downsample_other is True and config.downsample_frac == 0.25
        assert config.pretrained is False


def test_unknown_and_sagemaker_keys_are_ignored():
    config = parse_hyperparameters(
        {
            "target_species": "A",
            "_tuning_objective_metric": "validation:macro_f1",
            "sagemaker_region": "us-east-1",
            "made_up": "1",
        }
    )
    assert config.target_species == ("A",)


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

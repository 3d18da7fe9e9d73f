"""The launcher's reading of hyperparameters by the image's rules (contract/preflight.py): names
with the near miss, SageMaker's own keys allowed, values decoded as SageMaker delivers them.
The launcher's tests (test_launcher_training.py, test_launcher_tuning.py) show the same
refusals before any upload or call."""

import pytest
from species_classifier.contract.hyperparameters import ConfigError
from species_classifier.contract.preflight import (
    as_sagemaker_delivers,
    check_hyperparameters,
    check_names,
    check_value,
)


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("lerning_rate", "unknown hyperparameter 'lerning_rate': did you mean learning_rate?"),
        ("k-fold", "unknown hyperparameter 'k-fold': did you mean k_folds?"),
        ("colour", "unknown hyperparameter 'colour': known: target_species, csv_file, img_size"),
    ],
)
def test_the_launcher_refuses_unknown_names_with_the_near_miss(key, message):
    with pytest.raises(ConfigError) as error:
        check_names(["target_species", key])
    assert str(error.value).startswith(message)


def test_names_sagemaker_and_its_sdk_add_are_allowed():
    check_names(["k-folds", "sagemaker_program", "sagemaker_region", "_tuning_objective_metric"])


def test_values_reach_the_parser_as_sagemaker_delivers_them():
    raw = {"k_folds": "5", "pretrained": "false", "target_species": "A b", "x": '"q"'}
    assert as_sagemaker_delivers(raw) == {
        "k_folds": 5,
        "pretrained": False,
        "target_species": "A b",
        "x": "q",
    }


@pytest.mark.parametrize(
    ("strings", "message"),
    [
        ({"target_species": "A", "k_folds": "500"}, "k_folds=500 is out of range: allowed 1 to 20"),
        ({"target_species": "A", "lerning_rate": "0.01"}, "did you mean learning_rate?"),
        ({"target_species": "A", "pretrained": "yes please"}, "is not a boolean"),
    ],
)  # fmt: skip
def test_a_job_the_image_would_refuse_or_misread_is_refused(strings, message):
    with pytest.raises(ConfigError, match=message):
        check_hyperparameters(strings)


def test_a_job_the_image_accepts_reads_as_the_image_reads_it():
    config = check_hyperparameters({"target_species": "A,B", "k-folds": "5", "pretrained": "false"})
    assert (config.target_species, config.k_folds, config.pretrained) == (("A", "B"), 5, False)


@pytest.mark.parametrize(
    ("key", "text", "expected"),
    [("k_folds", "4", 4), ("learning_rate", "1e-3", 1e-3), ("precision", "bf16", "bf16")],
)
def test_a_trials_value_reads_as_the_image_reads_it(key, text, expected):
    assert check_value(key, text) == expected


def test_a_trials_value_out_of_range_is_refused():
    with pytest.raises(ConfigError, match="batch_size=1 is out of range: allowed 2 to 4096"):
        check_value("batch_size", "1")

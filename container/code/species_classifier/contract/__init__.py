"""The contract between the image and the tools that launch it: one copy of every rule both sides
apply, so what the image would refuse on a paid instance the launcher refuses on a laptop.

- `paths`: where SageMaker puts things under /opt/ml, the channel name, the checkpoint folder;
- `channel`: which CSV of the training channel is the index, and the columns it needs;
- `hyperparameters`: the schema of a job's hyperparameters and their one parser;
- `preflight`: that parser as the launcher runs it, stricter: unknown names refused;
- `metric_lines`: the metric log lines, the regexes that scrape them, the tuning objective;
- `serving`: every environment variable `serve` reads, and its parser.

Nothing here imports torch or numpy (tests/test_contract.py proves it for the tools): the
launcher and the collector import it on a laptop that has neither.
"""

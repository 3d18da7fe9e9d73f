"""Launch, watch, deploy, invoke and clean up the species classifier on SageMaker, with boto3 only.

One module per stage of the path from a terminal to the SageMaker API:
- `settings`: flags > environment > TOML config file, names, durations, one-line setting errors;
- `limits`: every documented request limit, checked before anything is uploaded or created;
- `session`: the boto3 clients of one run, `Command`, `JobFailed`, and `poll_until`, the one way to wait for AWS;
- `upload`: a local training channel to a content-addressed S3 prefix;
- `training`: `train`, `status`, `logs`, `stop`, with the CloudWatch log tail;
- `tuning`: `tune`, automatic model tuning whose trials `train` defines;
- `hosting`: models, `deploy` (instances, asynchronous or serverless), `delete`, endpoint states;
- `scaling`: endpoint autoscaling with Application Auto Scaling;
- `invoke`: photos to an endpoint (re-encoded when too large), predictions printed;
- `transform`: batch transform over an S3 prefix of photos;
- `cli`: the command line (`run-job`, or `scripts/run_job.py` from a clone).

The AWS endpoint comes from boto3's own configuration (`AWS_ENDPOINT_URL` included), so tests
against a local endpoint run this same code. See docs/sagemaker.md.
"""

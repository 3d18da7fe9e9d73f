"""A new user's first run of the image through the SageMaker Python SDK's local mode.

Run with the SDK's own venv (`make sdk-venv`), not the project's: the SDK pins versions that
clash with ours. Trains with `Estimator(instance_type="local").fit(...)`, deploys the result
with `.deploy(instance_type="local")` and asks for one prediction with the seed's JSON client
body `{"image": "<base64>"}`. Prints one JSON line: the model artifact and the answer.

    python tests/sdk_local_mode.py IMAGE CHANNEL_DIR OUTPUT_DIR PORT PHOTO HYPERPARAMETERS_JSON
"""

from __future__ import annotations

import base64
import json
import logging
import sys
from pathlib import Path

import boto3
from sagemaker.deserializers import JSONDeserializer
from sagemaker.estimator import Estimator
from sagemaker.local import LocalSession
from sagemaker.serializers import JSONSerializer

# Local mode never assumes the role, but the SDK requires one that looks like an ARN.
ROLE = "arn:aws:iam::123456789012:role/SageMakerRole"


def main() -> None:
    image, channel, output, port, photo, hyperparameters = sys.argv[1:]
    logging.basicConfig(level=logging.WARNING)
    session = LocalSession(boto_session=boto3.Session())
    session.config = {"local": {"local_code": True, "serving_port": int(port)}}
    estimator = Estimator(
        image_uri=image,
        role=ROLE,
        instance_count=1,
        instance_type="local",
        hyperparameters=json.loads(hyperparameters),
        output_path=Path(output).as_uri(),
        sagemaker_session=session,
    )
    estimator.fit({"training": Path(channel).as_uri()})
    predictor = estimator.deploy(
        initial_instance_count=1,
        instance_type="local",
        serializer=JSONSerializer(),
        deserializer=JSONDeserializer(),
    )
    try:
        answer = predictor.predict({"image": base64.b64encode(Path(photo).read_bytes()).decode()})
    finally:
        predictor.delete_endpoint()
    json.dump({"model_data": estimator.model_data, "answer": answer}, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()

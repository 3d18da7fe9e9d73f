"""`transform`: a batch transform job over an S3 prefix of photos, one JSON answer per photo.

The model is an existing one (`--model`) or one created for the job and named after it; with
`--wait` that model is deleted once the job has ended, otherwise `delete --transform-job` does.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from species_classifier import gpu

from species_tools.aws import SettingsError, split_s3_uri
from species_tools.launcher import limits
from species_tools.launcher.hosting import (
    add_model_arguments,
    create_model,
    model_environment,
    model_source,
)
from species_tools.launcher.invoke import PHOTO_CONTENT_TYPES
from species_tools.launcher.session import Command, Context, JobFailed, poll_until
from species_tools.launcher.settings import (
    DEFAULT_PREFIX,
    PROG,
    SettingsParser,
    add_wait_timeout,
    as_prefix,
    check_name,
    require,
    tag_list,
    timestamped_name,
)

JOB_TERMINAL = ("Completed", "Failed", "Stopped")


def add_transform_arguments(transform: SettingsParser) -> None:
    transform.add_argument("--input", metavar="S3_URI", help="prefix holding only photos")
    transform.add_argument(
        "--output", metavar="S3_URI", help="default s3://BUCKET/PREFIX/transform/JOB/"
    )
    transform.add_argument("--bucket", help="bucket for the default output (env SPECIES_BUCKET)")
    transform.add_argument(
        "--prefix", default=DEFAULT_PREFIX, help=f"key prefix (default {DEFAULT_PREFIX})"
    )
    transform.add_argument("--model", help="an existing SageMaker model (e.g. one deploy created)")
    add_model_arguments(transform, "creates a model named after the job")
    transform.add_argument("--instance-type", help="e.g. ml.g4dn.xlarge, ml.m5.xlarge")
    transform.add_argument("--instance-count", type=int, default=1, help="default 1")
    transform.add_argument(
        "--job-name", help="default species-classifier-transform-YYYYMMDD-HHMMSS-mmm"
    )
    transform.add_argument(
        "--max-payload-mb", type=int, default=6, help="largest photo in MB (default 6, max 100)"
    )
    transform.add_argument(
        "--max-concurrent",
        type=int,
        help="parallel requests per instance (default: the container's; "
        "x --max-payload-mb at most 100)",
    )
    transform.add_argument(
        "--invocations-timeout",
        type=int,
        default=600,
        help="seconds per request (1-3600, default 600)",
    )
    transform.add_argument(
        "--wait",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="wait for the job to end (then delete the model created for it)",
    )
    add_wait_timeout(transform, "1d", "the job to end")


def check_photo_prefix(s3: Any, uri: str) -> None:
    """Batch transform sends every object under the prefix to the model: only photos belong."""
    bucket, prefix = split_s3_uri(uri)
    keys = [
        item["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        for item in page.get("Contents", [])
        if not item["Key"].endswith("/")
    ]
    if not keys:
        raise SettingsError(f"no objects under {uri}")
    strangers = [key for key in keys if Path(key).suffix.lower() not in PHOTO_CONTENT_TYPES]
    if strangers:
        raise SettingsError(
            f"{len(strangers)} objects under {uri} are not photos (e.g. {strangers[0]}); "
            "batch transform would send them to the model: use a prefix that holds photos only"
        )


def transform_request(
    args: argparse.Namespace, job: str, model: str, input_uri: str, output: str
) -> dict[str, Any]:
    limits.check_transform_payload(args.max_payload_mb, args.max_concurrent)
    limits.check_instance_type(args.instance_type)
    limits.check_range(args.invocations_timeout, 1, 3600, "--invocations-timeout")
    tags = tag_list(args.tags)
    limits.check_tags(tags)
    request: dict[str, Any] = {
        "TransformJobName": job,
        "ModelName": model,
        # One photo per request: the container answers one JSON per photo.
        "BatchStrategy": "SingleRecord",
        "MaxPayloadInMB": args.max_payload_mb,
        "ModelClientConfig": {
            "InvocationsTimeoutInSeconds": args.invocations_timeout,
            "InvocationsMaxRetries": 1,
        },
        "TransformInput": {
            "DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": input_uri}},
            "ContentType": "application/x-image",
            "SplitType": "None",
        },
        "TransformOutput": {
            "S3OutputPath": output,
            "Accept": "application/json",
            "AssembleWith": "None",
        },
        "TransformResources": {
            "InstanceType": args.instance_type,
            "InstanceCount": args.instance_count,
        },
        "Tags": tags,
    }
    # Batch transform's newest driver (535) runs the image's CUDA only through the forward-
    # compatibility libraries; the default (470) not at all.
    ami = gpu.transform_ami(args.instance_type)
    if ami is not None:
        request["TransformResources"]["TransformAmiVersion"] = ami
    if args.max_concurrent:
        request["MaxConcurrentTransforms"] = args.max_concurrent
    return request


def command_transform(args: argparse.Namespace, ctx: Context) -> int:
    require(args, "input", "instance_type")
    job = check_name(args.job_name or timestamped_name(f"{DEFAULT_PREFIX}-transform"), "job name")
    input_uri = as_prefix(args.input)
    if args.output:
        output = args.output
    else:
        require(args, "bucket")
        output = f"s3://{args.bucket}/{args.prefix}/transform/{job}/"
    model = args.model or job
    request = transform_request(args, job, model, input_uri, output)
    environment = {} if args.model else model_environment(args)
    check_photo_prefix(ctx.aws.s3, input_uri)
    if not args.model:
        model_data = model_source(args, ctx)
        require(args, "image", "role")
        create_model(args, ctx, model, model_data, request["Tags"], environment)
    ctx.aws.sagemaker.create_transform_job(**request)
    ctx.out(
        f"transform job {job} created: {input_uri} -> {output} (one <photo>.out JSON per photo)"
    )
    if not args.wait:
        if not args.model:
            ctx.out(f"  when it has ended, remove its model: {PROG} delete --transform-job {job}")
        return 0
    printed = {"status": ""}

    def describe() -> dict[str, Any]:
        description = ctx.aws.sagemaker.describe_transform_job(TransformJobName=job)
        if description["TransformJobStatus"] != printed["status"]:
            printed["status"] = description["TransformJobStatus"]
            ctx.out(f"[{printed['status']}] {job}")
        return description

    description = poll_until(
        describe,
        lambda d: d["TransformJobStatus"] in JOB_TERMINAL,
        what=f"transform job {job} to end",
        timeout_s=args.wait_timeout,
        poll_seconds=args.poll_seconds,
        ctx=ctx,
    )
    if not args.model:
        ctx.aws.sagemaker.delete_model(ModelName=model)
        ctx.out(f"model {model} deleted (it was created for this job)")
    status = description["TransformJobStatus"]
    if status != "Completed":
        raise JobFailed(f"transform job {job} {status}: {description.get('FailureReason', '')}")
    ctx.out(f"predictions in {output}")
    return 0


COMMANDS = [
    Command(
        "transform",
        "batch transform over an S3 prefix of photos",
        add_transform_arguments,
        command_transform,
    )
]

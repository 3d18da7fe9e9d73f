"""Models and endpoints: `deploy` (create, update in place, or replace a Failed endpoint) and `delete`.

Every `EndpointStatus` the API defines is handled. Before anything is created, `deploy` waits
out the transitional states (Creating, Updating, SystemUpdating, RollingBack, Deleting) and
deletes a Failed endpoint, which accepts no other call; InService, OutOfService and
UpdateRollbackFailed endpoints are updated in place. `delete` removes an endpoint with every
config and model it uses, the pending ones of an update in flight included, and the model a
transform job was given.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from typing import Any

from botocore.exceptions import ClientError
from species_classifier import gpu
from species_classifier.contract.serving import (
    COMPILE_ENV,
    ServerConfigError,
    ServingEnvironment,
)

from species_tools.aws import SettingsError, is_not_found, split_s3_uri
from species_tools.launcher import limits, scaling
from species_tools.launcher.session import Command, Context, JobFailed, poll_until
from species_tools.launcher.settings import (
    PROG,
    SettingsParser,
    add_pairs,
    as_prefix,
    check_name,
    format_duration,
    join_s3,
    parse_duration,
    require,
    tag_list,
    timestamped_name,
)

# Of the nine EndpointStatus values, these are waited out; Failed is replaced, and the other
# three (InService, OutOfService, UpdateRollbackFailed) accept UpdateEndpoint.
TRANSITIONAL = ("Creating", "Updating", "SystemUpdating", "RollingBack", "Deleting")
MODEL_ENVIRONMENT_ENTRIES = 100
MODEL_ENVIRONMENT_LENGTH = 1024
DEFAULT_STARTUP_S = 600
# Compiling the serving model (the image's SPECIES_SERVE_COMPILE) takes minutes per batch
# shape before /ping answers: allow half an hour (SageMaker's maximum is 3600 s).
COMPILE_STARTUP_S = 1800
# Beyond the model download and start-up windows, instances take minutes to provision.
PROVISIONING_S = 30 * 60
SERVERLESS_MEMORY_MB = (1024, 2048, 3072, 4096, 5120, 6144)
SERVERLESS_DEFAULT_MB = 6144  # the most: the model and its fold ensemble load on CPU
SERVERLESS_DEFAULT_CONCURRENCY = 5


def add_model_arguments(parser: SettingsParser, creates_what: str) -> None:
    parser.add_argument("--training-job", help=f"serve this Completed job's model ({creates_what})")
    parser.add_argument("--tuning-job", help="serve the best trial of this tuning job")
    parser.add_argument("--model-data", metavar="S3_URI", help="serve this model.tar.gz")
    parser.add_argument(
        "--image", help="serving image (default: the training job's image; env SPECIES_IMAGE)"
    )
    parser.add_argument("--role", help="execution role ARN for the model (env SPECIES_ROLE_ARN)")
    add_pairs(
        parser,
        "--env",
        "env",
        "repeatable container environment variable, e.g. SAGEMAKER_MODEL_SERVER_WORKERS=1",
    )
    add_pairs(parser, "--tag", "tags", "repeatable tag")


def model_source(args: argparse.Namespace, ctx: Context) -> str:
    """The model.tar.gz to serve; with --training-job, that job's (which must be Completed)."""
    if sum(bool(source) for source in (args.training_job, args.tuning_job, args.model_data)) > 1:
        raise SettingsError("pass one of --training-job, --tuning-job and --model-data")
    if args.tuning_job:
        tuning = ctx.aws.sagemaker.describe_hyper_parameter_tuning_job(
            HyperParameterTuningJobName=args.tuning_job
        )
        best = tuning.get("BestTrainingJob")
        if not best:
            raise SettingsError(
                f"tuning job {args.tuning_job} is {tuning['HyperParameterTuningJobStatus']} "
                "and has no best trial yet"
            )
        args.training_job = best["TrainingJobName"]
        ctx.out(f"best trial of tuning job {args.tuning_job}: {args.training_job}")
    if args.training_job:
        d = ctx.aws.sagemaker.describe_training_job(TrainingJobName=args.training_job)
        if d["TrainingJobStatus"] != "Completed":
            raise SettingsError(
                f"training job {args.training_job} is {d['TrainingJobStatus']}: "
                "only a Completed job has a model to serve"
            )
        if not args.image:
            # The image that trained the model reads its bundle; used when no image is set.
            args.image = d["AlgorithmSpecification"]["TrainingImage"]
        return d["ModelArtifacts"]["S3ModelArtifacts"]
    if args.model_data:
        split_s3_uri(args.model_data)
        return args.model_data
    raise SettingsError(
        "missing model: pass --training-job NAME, --tuning-job NAME or --model-data S3_URI"
    )


def model_environment(args: argparse.Namespace) -> dict[str, str]:
    """--env, within the API's limits and read by the server's own parser: a value `serve`
    would refuse at start-up is refused here, before an instance is provisioned."""
    environment = dict(args.env or [])
    limits.check_environment(
        environment, "a model", MODEL_ENVIRONMENT_ENTRIES, MODEL_ENVIRONMENT_LENGTH
    )
    try:
        ServingEnvironment.parse(environment)
    except ServerConfigError as error:
        raise SettingsError(f"--env {error}") from None
    return environment


def create_model(
    args: argparse.Namespace,
    ctx: Context,
    name: str,
    model_data: str,
    tags: list[dict[str, str]],
    environment: Mapping[str, str],
) -> None:
    container: dict[str, Any] = {"Image": args.image, "ModelDataUrl": model_data}
    if environment:
        container["Environment"] = environment
    ctx.aws.sagemaker.create_model(
        ModelName=name, ExecutionRoleArn=args.role, PrimaryContainer=container, Tags=tags
    )
    ctx.out(f"model {name} created: {args.image} serving {model_data}")


# ---------------------------------------------------------------- endpoint states


def describe_endpoint(ctx: Context, endpoint: str) -> dict[str, Any] | None:
    """The endpoint's description, or None when there is no such endpoint."""
    try:
        return ctx.aws.sagemaker.describe_endpoint(EndpointName=endpoint)
    except ClientError as error:
        if is_not_found(error):
            return None
        raise


def status_printer(ctx: Context, endpoint: str):
    """describe() for poll_until that prints each new status of the endpoint once."""
    printed = {"status": ""}

    def describe() -> dict[str, Any] | None:
        description = describe_endpoint(ctx, endpoint)
        status = description["EndpointStatus"] if description else "gone"
        if status != printed["status"]:
            ctx.out(f"[{status}] {endpoint}")
            printed["status"] = status
        return description

    return describe


def settled_endpoint(
    ctx: Context, endpoint: str, poll_seconds: float, timeout_s: float
) -> dict[str, Any] | None:
    """The endpoint once it is in a state a deploy can act on (None: there is none)."""
    return watch_endpoint(
        ctx,
        endpoint,
        settled,
        f"endpoint {endpoint} to finish what it is doing before this deploy",
        poll_seconds,
        timeout_s,
    )


def settled(description: Mapping[str, Any] | None) -> bool:
    """Gone, or in a state that is not on its way to another."""
    return description is None or description["EndpointStatus"] not in TRANSITIONAL


def watch_endpoint(
    ctx: Context,
    endpoint: str,
    done: Callable[[Mapping[str, Any] | None], bool],
    what: str,
    poll_seconds: float,
    timeout_s: float,
) -> dict[str, Any] | None:
    """Poll the endpoint, printing each change of status, until `done` (None: it is gone)."""
    return poll_until(
        status_printer(ctx, endpoint),
        done,
        what=what,
        timeout_s=timeout_s,
        poll_seconds=poll_seconds,
        ctx=ctx,
    )


def models_of(ctx: Context, config: str) -> list[str]:
    variants = ctx.aws.sagemaker.describe_endpoint_config(EndpointConfigName=config)
    return [variant["ModelName"] for variant in variants["ProductionVariants"]]


def cleanup_hint(ctx: Context, config: str) -> str:
    models = "".join(f" --model {model}" for model in models_of(ctx, config))
    return f"{PROG} delete --endpoint-config {config}{models}"


def replace_failed_endpoint(
    ctx: Context, description: Mapping[str, Any], poll_seconds: float, timeout_s: float
) -> None:
    """Delete a Failed endpoint (the only call SageMaker accepts on one) and wait until it is gone."""
    endpoint = description["EndpointName"]
    old_config = description["EndpointConfigName"]
    hint = cleanup_hint(ctx, old_config)
    ctx.out(
        f"endpoint {endpoint} is Failed ({description.get('FailureReason') or 'no reason given'}); "
        "a Failed endpoint can only be deleted: deleting it, then creating it again"
    )
    ctx.aws.sagemaker.delete_endpoint(EndpointName=endpoint)
    watch_endpoint(
        ctx,
        endpoint,
        lambda d: d is None,
        f"the Failed endpoint {endpoint} to be deleted",
        poll_seconds,
        timeout_s,
    )
    ctx.out(f"  the failed deployment's config and model are kept; remove them with: {hint}")


def wait_until_in_service(
    ctx: Context, endpoint: str, poll_seconds: float, timeout_s: float
) -> dict[str, Any]:
    description = watch_endpoint(
        ctx, endpoint, settled, f"endpoint {endpoint} to be InService", poll_seconds, timeout_s
    )
    if description is None:
        raise JobFailed(f"endpoint {endpoint} was deleted while it deployed")
    status = description["EndpointStatus"]
    reason = description.get("FailureReason") or "no reason given"
    if status == "UpdateRollbackFailed":
        raise JobFailed(
            f"endpoint {endpoint} UpdateRollbackFailed: the update failed and so did the rollback; "
            f"it serves a mix of old and new configurations ({reason}). Deploy again, or delete it"
        )
    if status != "InService":
        raise JobFailed(f"endpoint {endpoint} {status}: {reason}")
    return description


# ---------------------------------------------------------------- deploy


def add_deploy_arguments(deploy: SettingsParser) -> None:
    deploy.add_argument(
        "--endpoint", help="endpoint name (created, or updated in place if it exists)"
    )
    add_model_arguments(deploy, "creates a model")
    deploy.add_argument(
        "--instance-type", help="e.g. ml.g5.xlarge, ml.g6.xlarge, ml.g4dn.xlarge, ml.m5.xlarge"
    )
    deploy.add_argument("--instance-count", type=int, default=1, help="default 1")
    deploy.add_argument(
        "--max-instances",
        type=int,
        help="autoscale between --min-instances and this many instances on invocations per "
        "instance (needs --max-rps)",
    )
    deploy.add_argument(
        "--min-instances", type=int, help="autoscaling floor (default: --instance-count)"
    )
    deploy.add_argument(
        "--max-rps",
        type=float,
        help="peak requests/s one instance sustains (scripts/bench_serving.py on that instance "
        "type); the scaling target is this x 0.5 x 60 per minute",
    )
    deploy.add_argument(
        "--async",
        dest="async_output",
        metavar="S3_URI",
        help="asynchronous endpoint: requests queue, answers land under this S3 prefix "
        "(for bursts; invoke waits for them)",
    )
    deploy.add_argument(
        "--serverless",
        action="store_true",
        help="serverless endpoint (CPU, scales to zero; no --instance-type) for rare traffic",
    )
    deploy.add_argument(
        "--memory",
        type=int,
        default=SERVERLESS_DEFAULT_MB,
        help=f"serverless only: MB per container, 1024-6144 in steps of 1024 "
        f"(default {SERVERLESS_DEFAULT_MB})",
    )
    deploy.add_argument(
        "--max-concurrency",
        type=int,
        default=SERVERLESS_DEFAULT_CONCURRENCY,
        help=f"serverless only: concurrent requests, 1-200 (default "
        f"{SERVERLESS_DEFAULT_CONCURRENCY})",
    )
    deploy.add_argument(
        "--startup-timeout",
        type=int,
        help=f"seconds for /ping to pass after start (60-3600; default {DEFAULT_STARTUP_S}, "
        f"{COMPILE_STARTUP_S} with --env {COMPILE_ENV}=1)",
    )
    deploy.add_argument(
        "--download-timeout",
        type=int,
        default=600,
        help="seconds to download the model (60-3600, default 600)",
    )
    deploy.add_argument(
        "--wait",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="wait until InService (default)",
    )
    deploy.add_argument(
        "--wait-timeout",
        type=parse_duration,
        help="give up waiting after this long (default: download + start-up timeouts + 30m); "
        "the deployment carries on",
    )


def compiles(environment: Mapping[str, str]) -> bool:
    """Whether the server will compile the model: its own reading of the variable."""
    return ServingEnvironment.parse(environment).compile_model


def startup_timeout(args: argparse.Namespace, environment: Mapping[str, str]) -> int:
    if args.startup_timeout is not None:
        return args.startup_timeout
    return COMPILE_STARTUP_S if compiles(environment) else DEFAULT_STARTUP_S


def check_serverless(args: argparse.Namespace, environment: Mapping[str, str]) -> None:
    """What a serverless endpoint cannot do, refused before anything is created."""
    if args.instance_type:
        raise SettingsError("--serverless: a serverless endpoint has no --instance-type")
    if args.memory not in SERVERLESS_MEMORY_MB:
        raise SettingsError(
            f"--memory must be one of {', '.join(map(str, SERVERLESS_MEMORY_MB))} MB, "
            f"got {args.memory}"
        )
    limits.check_range(args.max_concurrency, 1, 200, "--max-concurrency")
    if args.async_output:
        raise SettingsError(
            "--serverless and --async: SageMaker runs asynchronous endpoints on instances"
        )
    if compiles(environment):
        raise SettingsError(
            f"--serverless with {COMPILE_ENV}: a serverless container must answer /ping within "
            "3 minutes, too short to compile; leave compiling to instance endpoints"
        )


def async_config(output: str) -> dict[str, Any]:
    """Where an asynchronous endpoint writes its answers, and its failures beside them."""
    return {
        "OutputConfig": {"S3OutputPath": output, "S3FailurePath": join_s3(output, "failures") + "/"}
    }


def production_variant(args: argparse.Namespace, model: str, startup_s: int) -> dict[str, Any]:
    if args.serverless:
        return {
            "VariantName": "AllTraffic",
            "ModelName": model,
            "ServerlessConfig": {
                "MemorySizeInMB": args.memory,
                "MaxConcurrency": args.max_concurrency,
            },
        }
    variant = {
        "VariantName": "AllTraffic",
        "ModelName": model,
        "InstanceType": args.instance_type,
        "InitialInstanceCount": args.instance_count,
        # The default start-up window (about 4 minutes) is short for a cold GPU model load.
        "ContainerStartupHealthCheckTimeoutInSeconds": startup_s,
        "ModelDataDownloadTimeoutInSeconds": args.download_timeout,
    }
    # A GPU host's default driver (470 on ml.g4dn, g5, p4d) is too old for the image's CUDA.
    ami = gpu.endpoint_ami(args.instance_type)
    if ami is not None:
        variant["InferenceAmiVersion"] = ami
    return variant


def describe_variant(variant: Mapping[str, Any]) -> str:
    serverless = variant.get("ServerlessConfig")
    if serverless:
        return (
            f"serverless, {serverless['MemorySizeInMB']} MB, "
            f"up to {serverless['MaxConcurrency']} concurrent requests"
        )
    return (
        f"{variant['InitialInstanceCount']} x {variant['InstanceType']}, start-up window "
        f"{format_duration(variant['ContainerStartupHealthCheckTimeoutInSeconds'])}"
    )


def is_serverless(description: Mapping[str, Any]) -> bool:
    return any("CurrentServerlessConfig" in v for v in description.get("ProductionVariants", []))


def check_autoscaling(args: argparse.Namespace) -> None:
    if args.max_instances is None:
        if args.min_instances is not None or args.max_rps is not None:
            raise SettingsError("--min-instances and --max-rps need --max-instances")
        return
    if args.serverless:
        raise SettingsError("--max-instances: a serverless endpoint scales by itself")
    if not args.wait:
        raise SettingsError(
            "--max-instances needs the endpoint InService before it can be registered: "
            "leave out --no-wait"
        )
    if args.max_rps is None or args.max_rps <= 0:
        raise SettingsError(
            "--max-instances needs --max-rps: the peak requests/s one instance sustains "
            "(run scripts/bench_serving.py against that instance type)"
        )
    floor = args.instance_count if args.min_instances is None else args.min_instances
    if not 1 <= floor <= args.max_instances:
        raise SettingsError(
            f"autoscaling needs 1 <= --min-instances ({floor}) <= --max-instances "
            f"({args.max_instances})"
        )
    args.min_instances = floor


def instance_type_of(ctx: Context, config: str) -> str | None:
    variants = ctx.aws.sagemaker.describe_endpoint_config(EndpointConfigName=config)
    return variants["ProductionVariants"][0].get("InstanceType")


def command_deploy(args: argparse.Namespace, ctx: Context) -> int:
    require(args, "endpoint")
    endpoint = check_name(args.endpoint, "endpoint name")
    environment = model_environment(args)
    if args.serverless:
        check_serverless(args, environment)
    else:
        require(args, "instance_type")
        limits.check_instance_type(args.instance_type)
    check_autoscaling(args)
    if args.async_output:
        args.async_output = as_prefix(args.async_output)
        split_s3_uri(args.async_output)
    startup_s = startup_timeout(args, environment)
    limits.check_range(startup_s, 60, 3600, "--startup-timeout")
    limits.check_range(args.download_timeout, 60, 3600, "--download-timeout")
    tags = tag_list(args.tags)
    limits.check_tags(tags)
    timeout_s = args.wait_timeout or startup_s + args.download_timeout + PROVISIONING_S
    model_data = model_source(args, ctx)
    require(args, "image", "role")

    existing = settled_endpoint(ctx, endpoint, args.poll_seconds, timeout_s)
    if existing is not None and existing["EndpointStatus"] == "Failed":
        replace_failed_endpoint(ctx, existing, args.poll_seconds, timeout_s)
        existing = None
    if existing is not None and is_serverless(existing) != args.serverless:
        kinds = ("on instances", "serverless")
        raise SettingsError(
            f"endpoint {endpoint} runs {kinds[is_serverless(existing)]} and SageMaker cannot "
            f"update it to run {kinds[args.serverless]}: delete it first "
            f"({PROG} delete --endpoint {endpoint}) or deploy under another name"
        )

    model = timestamped_name(endpoint)
    config = timestamped_name(f"{endpoint[:40]}-config")
    create_model(args, ctx, model, model_data, tags, environment)
    variant = production_variant(args, model, startup_s)
    extra = {"AsyncInferenceConfig": async_config(args.async_output)} if args.async_output else {}
    ctx.aws.sagemaker.create_endpoint_config(
        EndpointConfigName=config, ProductionVariants=[variant], Tags=tags, **extra
    )
    answers = f"; asynchronous, answers under {args.async_output}" if args.async_output else ""
    ctx.out(f"endpoint config {config} created: {describe_variant(variant)}{answers}")
    if existing is not None:
        previous = existing["EndpointConfigName"]
        if not args.serverless and instance_type_of(ctx, previous) != args.instance_type:
            scaling.deregister(
                ctx, endpoint, "SageMaker refuses to change a scaled variant's instance type"
            )
        ctx.aws.sagemaker.update_endpoint(EndpointName=endpoint, EndpointConfigName=config)
        ctx.out(
            f"endpoint {endpoint} updating in place from {existing['EndpointStatus']} "
            f"(it serves {previous} until then)"
        )
        ctx.out(
            f"  once it is InService, remove what it no longer uses: {cleanup_hint(ctx, previous)}"
        )
    else:
        ctx.aws.sagemaker.create_endpoint(
            EndpointName=endpoint, EndpointConfigName=config, Tags=tags
        )
        ctx.out(f"endpoint {endpoint} creating")
    if not args.wait:
        return 0
    try:
        description = wait_until_in_service(ctx, endpoint, args.poll_seconds, timeout_s)
    except KeyboardInterrupt:
        ctx.err(f"stopped waiting; endpoint {endpoint} keeps deploying")
        return 130
    if description["EndpointConfigName"] != config:
        raise JobFailed(
            f"endpoint {endpoint} rolled back to {description['EndpointConfigName']}: "
            f"{description.get('FailureReason', 'no reason given')}"
        )
    ctx.out(f"endpoint {endpoint} is InService. Try: {PROG} invoke --endpoint {endpoint} PHOTO.jpg")
    if args.max_instances is not None:
        scaling.register(ctx, endpoint, args.min_instances, args.max_instances, args.max_rps)
    return 0


# ---------------------------------------------------------------- delete


def add_delete_arguments(delete: SettingsParser) -> None:
    delete.add_argument(
        "--endpoint",
        help="endpoint to delete, with its config and models (and those of an update in flight)",
    )
    delete.add_argument(
        "--transform-job", help="delete the model this transform job created (named after it)"
    )
    delete.add_argument(
        "--endpoint-config", action="append", help="also delete this endpoint config (repeatable)"
    )
    delete.add_argument("--model", action="append", help="also delete this model (repeatable)")
    delete.add_argument(
        "--keep-model", action="store_true", help="keep the endpoint's models (e.g. for transform)"
    )


def transform_model(ctx: Context, job: str) -> list[str]:
    """The model `transform` created for this job: named after it; any other model is kept."""
    model = ctx.aws.sagemaker.describe_transform_job(TransformJobName=job)["ModelName"]
    if model == job:
        return [model]
    ctx.out(f"model {model} of transform job {job} was not created for it: kept")
    return []


def command_delete(args: argparse.Namespace, ctx: Context) -> int:
    sm = ctx.aws.sagemaker
    configs = list(args.endpoint_config or [])
    models = list(args.model or [])
    if not (args.endpoint or args.transform_job or configs or models):
        raise SettingsError(
            "nothing to delete: pass --endpoint NAME (and/or --transform-job, --endpoint-config, "
            "--model)"
        )
    if args.transform_job:
        models += transform_model(ctx, args.transform_job)
    if args.endpoint:
        description = sm.describe_endpoint(EndpointName=args.endpoint)
        # An update in flight has its own config and model, which the endpoint never adopted.
        pending = (description.get("PendingDeploymentSummary") or {}).get("EndpointConfigName")
        endpoint_configs = [description["EndpointConfigName"]]
        if pending and pending not in endpoint_configs:
            endpoint_configs.append(pending)
        endpoint_models = [model for config in endpoint_configs for model in models_of(ctx, config)]
        scaling.deregister(ctx, args.endpoint, "its endpoint is being deleted")
        sm.delete_endpoint(EndpointName=args.endpoint)
        ctx.out(f"endpoint {args.endpoint} deleted (billing stops as its instances shut down)")
        configs[:0] = endpoint_configs
        if not args.keep_model:
            models[:0] = endpoint_models
    for config in dict.fromkeys(configs):
        sm.delete_endpoint_config(EndpointConfigName=config)
        ctx.out(f"endpoint config {config} deleted")
    for model in dict.fromkeys(models):
        sm.delete_model(ModelName=model)
        ctx.out(f"model {model} deleted")
    return 0


COMMANDS = [
    Command(
        "deploy",
        "create or update an endpoint from a training job or a model.tar.gz, wait for InService",
        add_deploy_arguments,
        command_deploy,
    ),
    Command(
        "delete",
        "delete an endpoint with its endpoint configs and models, or leftovers by name",
        add_delete_arguments,
        command_delete,
    ),
]

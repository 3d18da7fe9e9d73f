"""Endpoint autoscaling: the variant registered with Application Auto Scaling, one target-tracking
policy on invocations per instance, and its removal where SageMaker requires it.

The target follows SageMaker's load-testing guide: invocations per instance per minute =
peak requests per second of one instance (measure it with scripts/bench_serving.py on the
instance type you deploy) x a safety factor of 0.5 x 60. SageMaker refuses an update that
changes the instance type of a scaled variant, so such an update deregisters it first.
"""

from __future__ import annotations

from typing import Any

from species_tools.launcher.session import Context

NAMESPACE = "sagemaker"
DIMENSION = "sagemaker:variant:DesiredInstanceCount"
METRIC = "SageMakerVariantInvocationsPerInstance"
SAFETY_FACTOR = 0.5
VARIANT = "AllTraffic"


def resource_id(endpoint: str) -> str:
    return f"endpoint/{endpoint}/variant/{VARIANT}"


def target_invocations_per_minute(max_rps: float) -> float:
    return round(max_rps * SAFETY_FACTOR * 60, 1)


def policy_name(endpoint: str) -> str:
    return f"{endpoint}-invocations-per-instance"


def autoscaling(ctx: Context) -> Any:
    return ctx.aws.client("application-autoscaling")


def registered(ctx: Context, endpoint: str) -> dict[str, Any] | None:
    """The endpoint variant's scalable target, or None when it does not scale."""
    targets = autoscaling(ctx).describe_scalable_targets(
        ServiceNamespace=NAMESPACE, ResourceIds=[resource_id(endpoint)], ScalableDimension=DIMENSION
    )["ScalableTargets"]
    return targets[0] if targets else None


def register(
    ctx: Context, endpoint: str, min_instances: int, max_instances: int, max_rps: float
) -> None:
    """Scale the endpoint between min and max instances on invocations per instance."""
    client = autoscaling(ctx)
    client.register_scalable_target(
        ServiceNamespace=NAMESPACE,
        ResourceId=resource_id(endpoint),
        ScalableDimension=DIMENSION,
        MinCapacity=min_instances,
        MaxCapacity=max_instances,
    )
    target = target_invocations_per_minute(max_rps)
    client.put_scaling_policy(
        PolicyName=policy_name(endpoint),
        ServiceNamespace=NAMESPACE,
        ResourceId=resource_id(endpoint),
        ScalableDimension=DIMENSION,
        PolicyType="TargetTrackingScaling",
        TargetTrackingScalingPolicyConfiguration={
            "TargetValue": target,
            "PredefinedMetricSpecification": {"PredefinedMetricType": METRIC},
        },
    )
    ctx.out(
        f"autoscaling {endpoint}: {min_instances}-{max_instances} instances, target {target:g} "
        f"invocations per instance per minute ({max_rps:g} requests/s x {SAFETY_FACTOR} x 60)"
    )


def deregister(ctx: Context, endpoint: str, why: str) -> bool:
    """Remove the endpoint's scalable target and its policies; False when there was none."""
    if registered(ctx, endpoint) is None:
        return False
    client = autoscaling(ctx)
    # SageMaker's guide: delete the policies, then deregister (AWS would drop them with the
    # target; removing them first leaves nothing behind in any case).
    policies = client.describe_scaling_policies(
        ServiceNamespace=NAMESPACE, ResourceId=resource_id(endpoint), ScalableDimension=DIMENSION
    )["ScalingPolicies"]
    for policy in policies:
        client.delete_scaling_policy(
            PolicyName=policy["PolicyName"],
            ServiceNamespace=NAMESPACE,
            ResourceId=resource_id(endpoint),
            ScalableDimension=DIMENSION,
        )
    client.deregister_scalable_target(
        ServiceNamespace=NAMESPACE, ResourceId=resource_id(endpoint), ScalableDimension=DIMENSION
    )
    ctx.out(f"autoscaling of {endpoint} removed ({why})")
    return True

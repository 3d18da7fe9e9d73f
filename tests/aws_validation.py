"""Requests checked as strictly as the real AWS services check them, for fakes that accept anything.

moto accepts names, tags, enums and sizes that AWS refuses, and botocore's own validator checks
only types, required members and minimum lengths. This validator walks every request against
botocore's service model: types, required and unknown members, minimum and maximum lengths and
values, patterns (the model's Java regexes, run with the `regex` module, which knows `\\p{L}`)
and enums; then the documented limits the model does not encode. `install(session)` hooks it
into a boto3 session's `before-parameter-build` event, so a bad request raises `InvalidRequest`
before it is sent; `install_everywhere()` does the same for every session a process creates
(used through sitecustomize for the launcher run as a real process).
"""

from __future__ import annotations

import datetime
import functools
from collections.abc import Mapping
from typing import Any

import botocore.handlers
import botocore.session
import regex
from botocore.model import OperationModel, Shape

MAX_PAYLOAD_MB = 100


class InvalidRequest(Exception):
    """A request the real service would refuse; the message lists every fault."""


@functools.cache
def java_pattern(pattern: str) -> regex.Pattern:
    # The models' patterns are Java regexes matched against the whole value. Java spells the
    # end of input `\z` (Python: `\Z`) and writes characters beyond U+FFFF as UTF-16
    # surrogate pairs, so its range of all of them is `\uD800\uDC00-\uDBFF\uDFFF`.
    python = pattern.replace(r"\z", r"\Z").replace(
        r"\uD800\uDC00-\uDBFF\uDFFF", r"\U00010000-\U0010FFFF"
    )
    return regex.compile(python)


def shape_faults(shape: Shape, value: Any, path: str) -> list[str]:
    """Every way `value` breaks `shape`, each as `path: what`."""
    kind = shape.type_name
    meta = shape.metadata
    if kind == "structure":
        if not isinstance(value, Mapping):
            return [f"{path}: expected a structure, got {type(value).__name__}"]
        faults = [
            f"{path}: missing required member {name}"
            for name in meta.get("required", [])
            if name not in value
        ]
        for name, member in value.items():
            if name not in shape.members:
                faults.append(f"{path}: unknown member {name}")
            else:
                faults += shape_faults(shape.members[name], member, f"{path}.{name}")
        return faults
    if kind == "list":
        if not isinstance(value, list | tuple):
            return [f"{path}: expected a list, got {type(value).__name__}"]
        faults = size_faults(len(value), meta, path, "entries")
        for index, item in enumerate(value):
            faults += shape_faults(shape.member, item, f"{path}[{index}]")
        return faults
    if kind == "map":
        if not isinstance(value, Mapping):
            return [f"{path}: expected a map, got {type(value).__name__}"]
        faults = size_faults(len(value), meta, path, "entries")
        for key, item in value.items():
            faults += shape_faults(shape.key, key, f"{path} key {key!r}")
            faults += shape_faults(shape.value, item, f"{path}[{key!r}]")
        return faults
    if kind == "string":
        if not isinstance(value, str):
            return [f"{path}: expected a string, got {type(value).__name__}"]
        faults = size_faults(len(value), meta, path, "characters")
        if "pattern" in meta and not java_pattern(meta["pattern"]).fullmatch(value):
            faults.append(f"{path}: {value[:80]!r} does not match {meta['pattern']}")
        if shape.enum and value not in shape.enum:
            faults.append(f"{path}: {value!r} is not one of {shape.enum}")
        return faults
    if kind in ("integer", "long"):
        if not isinstance(value, int) or isinstance(value, bool):
            return [f"{path}: expected an integer, got {type(value).__name__}"]
        return range_faults(value, meta, path)
    if kind in ("float", "double"):
        if not isinstance(value, int | float) or isinstance(value, bool):
            return [f"{path}: expected a number, got {type(value).__name__}"]
        return range_faults(value, meta, path)
    if kind == "boolean":
        return [] if isinstance(value, bool) else [f"{path}: expected true or false, {value!r}"]
    if kind == "blob":
        if isinstance(value, bytes | bytearray | str):
            return size_faults(len(value), meta, path, "bytes")
        return [] if hasattr(value, "read") else [f"{path}: expected bytes or a file"]
    if kind == "timestamp":
        ok = isinstance(value, datetime.datetime | str | int | float)
        return [] if ok else [f"{path}: expected a timestamp, got {type(value).__name__}"]
    return []


def size_faults(size: int, meta: Mapping[str, Any], path: str, unit: str) -> list[str]:
    low, high = meta.get("min"), meta.get("max")
    if low is not None and size < low:
        return [f"{path}: {size} {unit}, at least {low} required"]
    if high is not None and size > high:
        return [f"{path}: {size} {unit}, at most {high} allowed"]
    return []


def range_faults(value: float, meta: Mapping[str, Any], path: str) -> list[str]:
    low, high = meta.get("min"), meta.get("max")
    if low is not None and value < low:
        return [f"{path}: {value} is below the minimum {low}"]
    if high is not None and value > high:
        return [f"{path}: {value} is above the maximum {high}"]
    return []


def documented_faults(operation: str, params: Mapping[str, Any]) -> list[str]:
    """Limits in the API reference that the service model does not encode."""
    faults = [
        f"Tags: key {tag.get('Key')!r} uses the reserved aws: prefix"
        for tag in params.get("Tags") or []
        if isinstance(tag, Mapping) and str(tag.get("Key", "")).lower().startswith("aws:")
    ]
    keep_alive = (params.get("ResourceConfig") or {}).get("KeepAlivePeriodInSeconds")
    if operation == "CreateTrainingJob" and params.get("EnableManagedSpotTraining") and keep_alive:
        faults.append("ResourceConfig: warm pools (KeepAlivePeriodInSeconds) do not work with spot")
    if operation == "CreateTrainingJob" and params.get("EnableManagedSpotTraining"):
        stopping = params.get("StoppingCondition") or {}
        runtime, wait = stopping.get("MaxRuntimeInSeconds"), stopping.get("MaxWaitTimeInSeconds")
        if wait is None:
            faults.append("StoppingCondition: managed spot needs MaxWaitTimeInSeconds")
        elif runtime is not None and wait < runtime:
            faults.append(
                f"StoppingCondition: MaxWaitTimeInSeconds {wait} < MaxRuntimeInSeconds {runtime}"
            )
    if operation == "CreateTransformJob":
        payload = params.get("MaxPayloadInMB", 6)
        concurrent = params.get("MaxConcurrentTransforms")
        if payload > MAX_PAYLOAD_MB:
            faults.append(f"MaxPayloadInMB: {payload}, at most {MAX_PAYLOAD_MB} allowed")
        if concurrent is not None and concurrent * payload > MAX_PAYLOAD_MB:
            faults.append(
                f"MaxConcurrentTransforms x MaxPayloadInMB = {concurrent * payload}, "
                f"at most {MAX_PAYLOAD_MB} allowed"
            )
    return faults


def request_faults(model: OperationModel, params: Mapping[str, Any]) -> list[str]:
    faults = shape_faults(model.input_shape, params, model.name) if model.input_shape else []
    return faults + documented_faults(model.name, params)


def validate(service: str, operation: str, params: Mapping[str, Any]) -> list[str]:
    """The faults of one request, e.g. validate("sagemaker", "CreateEndpoint", {...})."""
    model = botocore.session.get_session().get_service_model(service)
    return request_faults(model.operation_model(operation), params)


def check_request(params: Mapping[str, Any], model: OperationModel, **_: Any) -> None:
    """The `before-parameter-build` handler: raise before a bad request leaves the client."""
    faults = request_faults(model, params)
    if faults:
        service = model.service_model.service_name
        raise InvalidRequest(f"{service}.{model.name} would be refused: " + "; ".join(faults))


def install(session: Any) -> Any:
    """Check every request a boto3 (or botocore) session's clients build."""
    session.events.register("before-parameter-build", check_request)
    return session


def install_everywhere() -> None:
    """Check every request of every session this process creates from now on."""
    botocore.handlers.BUILTIN_HANDLERS.append(("before-parameter-build", check_request))

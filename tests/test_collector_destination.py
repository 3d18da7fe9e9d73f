"""Where the photos go (destination.py): server-side copies, the fallback through this machine
when S3 refuses them to the user's credentials, and the IAM policy that every signed request
needs.
"""

from __future__ import annotations

import json
from collections import Counter
from fnmatch import fnmatchcase
from urllib.parse import parse_qs

import boto3
from collector_helpers import (
    EXPECTED_SPECIES,
    POLICY,
    SELECTED,
    SOURCE,
    TARGET,
    check_attribution,
    photo_requests,
    run_cli,
    target_csv,
    write_config,
)


def test_a_copy_refused_to_the_users_credentials_falls_back_to_get_and_put(
    collector_s3, s3_front, tmp_path
):
    # The source bucket reads anonymously but refuses the user's signed requests, as the
    # real one does for a user whose policy allows only their own bucket.
    s3_front.public_buckets.add(SOURCE)
    prefix = "fallback/training/"
    config = write_config(tmp_path / "c.toml", f"s3://{TARGET}/{prefix}")
    result = run_cli("--config", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr.count("S3 refused a server-side copy") == 1, result.stderr
    assert "anonymous GET, then PUT" in result.stderr
    assert "copied now 31, already there 0, missing at source 1, failed 0" in result.stdout

    copies = [r for r in s3_front.requests if r.copy_source.startswith(SOURCE + "/")]
    assert copies and all(r.status == 403 and r.signed for r in copies)
    assert len(copies) <= 4  # at most the copies in flight when the first was refused
    # Each refused copy was checked with an anonymous HEAD (the photo is there for anyone).
    heads = [r for r in photo_requests(s3_front, SOURCE) if r.method == "HEAD"]
    assert {r.key for r in heads} >= {r.copy_source.partition("/")[2] for r in copies}
    assert not any(r.signed for r in heads)
    gets = [r for r in photo_requests(s3_front, SOURCE) if r.method == "GET"]
    assert len(gets) == SELECTED and not any(r.signed for r in gets)
    puts = [
        r for r in s3_front.requests
        if r.method == "PUT" and r.key.startswith(prefix + "images/") and not r.copy_source
    ]  # fmt: skip
    assert len(puts) == SELECTED - 1 and all(r.signed and r.status == 200 for r in puts)

    rows = target_csv(prefix)
    check_attribution(rows)
    assert Counter(r["species_name"] for r in rows) == EXPECTED_SPECIES
    s3 = boto3.client("s3")
    for row in rows:
        key = f"photos/{row['photo_id']}/medium.{row['image_name'].rsplit('.', 1)[1]}"
        body = s3.get_object(Bucket=TARGET, Key=prefix + row["image_name"])["Body"].read()
        assert body == collector_s3["data"].images[key]


def _needs(request) -> list[tuple[str, str, str]]:
    """(action, resource, s3:prefix) that S3 authorizes for one signed request."""
    if not request.key:
        prefix = parse_qs(request.query).get("prefix", [""])[0]
        return [("s3:ListBucket", f"arn:aws:s3:::{request.bucket}", prefix)]
    arn = f"arn:aws:s3:::{request.bucket}/{request.key}"
    if request.method in ("GET", "HEAD"):
        return [("s3:GetObject", arn, "")]
    needs = [("s3:PutObject", arn, "")]
    if request.copy_source:
        needs.append(("s3:GetObject", f"arn:aws:s3:::{request.copy_source}", ""))
    return needs


def _allows(policy: dict, action: str, resource: str, prefix: str) -> bool:
    def listed(value) -> list[str]:
        return [value] if isinstance(value, str) else value

    for statement in policy["Statement"]:
        prefixes = statement.get("Condition", {}).get("StringLike", {}).get("s3:prefix")
        if (
            statement["Effect"] == "Allow"
            and action in listed(statement["Action"])
            and any(fnmatchcase(resource, r) for r in listed(statement["Resource"]))
            and (prefixes is None or any(fnmatchcase(prefix, p) for p in prefixes))
        ):
            return True
    return False


def test_the_iam_policy_allows_every_request_signed_with_the_users_credentials(
    collector_s3, s3_front, tmp_path
):
    prefix = "policy/training"
    policy = json.loads(POLICY.read_text().replace("BUCKET", TARGET).replace("PREFIX", prefix))
    config = write_config(tmp_path / "c.toml", f"s3://{TARGET}/{prefix}")
    result = run_cli("--config", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    signed = [r for r in s3_front.requests if r.signed]
    kinds = {(r.method, bool(r.key), bool(r.copy_source)) for r in signed}
    # Listing the channel, reading the plan, server-side copies, writing the plan and CSV.
    assert kinds == {("GET", False, False), ("GET", True, False), ("PUT", True, True),
                     ("PUT", True, False)}  # fmt: skip
    for request in signed:
        for need in _needs(request):
            assert _allows(policy, *need), f"{POLICY.name} does not allow {need}"

    # Without the open-data statement, only the server-side copies are refused, and the
    # collection completes through this machine.
    s3_front.reset()
    s3_front.public_buckets.add(SOURCE)
    policy["Statement"] = [s for s in policy["Statement"] if "inaturalist" not in str(s)]
    fallback = run_cli("--config", str(config), "--dest", f"s3://{TARGET}/{prefix}/again")
    assert fallback.returncode == 0, fallback.stdout + fallback.stderr
    for request in (r for r in s3_front.requests if r.signed):
        allowed = all(_allows(policy, *need) for need in _needs(request))
        assert allowed == (request.status != 403), request

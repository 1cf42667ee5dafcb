"""Create S3 buckets if they are missing: the compose stack's one-shot ``s3-init`` step.

    AWS_ENDPOINT_URL=http://minio:9000 AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=... \\
        python infra/create_buckets.py mlflow dvc

Speaks plain S3 through boto3 (not MinIO's ``mc``), so the stack works with any S3-compatible
server image. Idempotent: a bucket that exists and is ours is left as it is. Waits up to
``--wait-s`` for the endpoint to answer, since a one-shot container may start first.
Exit codes: 0 done, 1 an S3 error (the message names the bucket), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def client(endpoint: str | None):
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=endpoint,
                        config=Config(retries={"max_attempts": 2, "mode": "standard"},
                                      connect_timeout=5, read_timeout=30))


def wait_for(s3, wait_s: float) -> None:
    """Until ``list_buckets`` answers (credentials checked too), or raise the last error."""
    from botocore.exceptions import ClientError, EndpointConnectionError

    deadline = time.monotonic() + wait_s
    while True:
        try:
            s3.list_buckets()
            return
        except EndpointConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)
        except ClientError as exc:  # bad credentials are not worth waiting for
            raise SystemExit(f"create_buckets: {s3.meta.endpoint_url}: {exc}") from None


def ensure(s3, bucket: str) -> bool:
    """Create ``bucket`` unless it exists; True when it was created."""
    from botocore.exceptions import ClientError

    try:
        s3.head_bucket(Bucket=bucket)
        return False
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket"):
            raise SystemExit(f"create_buckets: bucket {bucket!r}: {exc}") from None
    try:
        s3.create_bucket(Bucket=bucket)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") != "BucketAlreadyOwnedByYou":
            raise SystemExit(f"create_buckets: bucket {bucket!r}: {exc}") from None
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="create_buckets.py", description=__doc__.split("\n")[0])
    parser.add_argument("buckets", nargs="+", help="bucket names")
    parser.add_argument("--endpoint", default=os.environ.get("AWS_ENDPOINT_URL"),
                        help="S3 endpoint (default: $AWS_ENDPOINT_URL; none: AWS)")
    parser.add_argument("--wait-s", type=float, default=60.0)
    args = parser.parse_args(argv)
    bad = [b for b in args.buckets if not BUCKET_NAME.match(b)]
    if bad:
        parser.error(f"invalid bucket name(s): {', '.join(bad)} "
                     "(3-63 lowercase letters, digits, '.' and '-')")
    s3 = client(args.endpoint)
    wait_for(s3, args.wait_s)
    for bucket in args.buckets:
        created = ensure(s3, bucket)
        print(f"create_buckets: {bucket}: {'created' if created else 'exists'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

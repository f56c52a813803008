"""Real servers on 127.0.0.1 for tests and benchmarks: an S3-compatible one (moto's server mode).

``s3_server()`` starts moto's threaded server on a free port, points the standard AWS variables at it
(``AWS_ENDPOINT_URL`` and test credentials) for its lifetime, and restores them afterwards. ``require_auth``
makes the server check signatures against an IAM key it created, so wrong credentials are rejected the
way a real S3 rejects them.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator

_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL",
        "AWS_SESSION_TOKEN", "AWS_PROFILE")


def _clear_fsspec_cache() -> None:
    # fsspec caches S3FileSystem instances: one made for an earlier server would keep its endpoint
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


@contextlib.contextmanager
def s3_server() -> Iterator[str]:
    """Yield the endpoint URL of a fresh moto S3 server on 127.0.0.1 (stopped on exit)."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in _ENV}
    os.environ.pop("AWS_SESSION_TOKEN", None)
    os.environ.pop("AWS_PROFILE", None)
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=url)
    _clear_fsspec_cache()
    try:
        yield url
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _clear_fsspec_cache()


def require_auth(endpoint: str) -> tuple[str, str]:
    """Create an IAM user allowed everything, switch the server to checking every request, return its key."""
    import boto3
    import requests

    iam = boto3.client("iam", endpoint_url=endpoint)
    iam.create_user(UserName="gcl-test")
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
    iam.put_user_policy(UserName="gcl-test", PolicyName="all", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="gcl-test")["AccessKey"]
    requests.post(f"{endpoint}/moto-api/reset-auth", data=b"0", timeout=10).raise_for_status()
    return key["AccessKeyId"], key["SecretAccessKey"]


def drop_auth(endpoint: str) -> None:
    import requests

    requests.post(f"{endpoint}/moto-api/reset-auth", data=b"inf", timeout=10).raise_for_status()

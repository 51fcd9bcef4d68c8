"""Drives boto3, a real S3 client that signs every request with SigV4, for tests/e2e.rs.

Usage: s3_client.py ENDPOINT DIRECT_ENDPOINT CALLS.json

CALLS.json is a list of {"call": boto3 method, "params": {...}, "token": N or null,
"direct": bool, "save": name}. A call goes through ENDPOINT (fencegate), or straight to
DIRECT_ENDPOINT (the storage) when "direct" is true. A string parameter "$name" is replaced by
the UploadId saved under that name. Prints one JSON result per call: {"status", "body"}, where
"body" is a GetObject's body as text, or the list of keys of a ListObjectsV2; a call that got no
answer has status 0 and says why.
"""

import json
import sys

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

endpoint, direct_endpoint, calls_file = sys.argv[1:4]
token = {"value": None}


def client(url):
    c = boto3.client(
        "s3",
        endpoint_url=url,
        aws_access_key_id="AK",
        aws_secret_access_key="SK",
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}, read_timeout=10),
    )

    # The token is added before signing, as a leader would: SigV4 signs it too.
    def add_token(request, **_):
        if token["value"] is not None:
            request.headers["Fencing-Token"] = str(token["value"])

    c.meta.events.register("before-sign.s3.*", add_token)
    return c


through, direct = client(endpoint), client(direct_endpoint)
saved = {}
results = []
for call in json.load(open(calls_file)):
    token["value"] = call.get("token")
    params = {
        k: saved.get(v[1:], v) if isinstance(v, str) and v.startswith("$") else v
        for k, v in call.get("params", {}).items()
    }
    s3 = direct if call.get("direct") else through
    try:
        response = getattr(s3, call["call"])(**params)
        status = response["ResponseMetadata"]["HTTPStatusCode"]
        body = None
        if "Body" in response:
            body = response["Body"].read().decode()
        elif "Contents" in response or call["call"] == "list_objects_v2":
            body = sorted(o["Key"] for o in response.get("Contents", []))
        if "save" in call:
            saved[call["save"]] = response["UploadId"]
        results.append({"status": status, "body": body})
    except ClientError as e:
        results.append({"status": e.response["ResponseMetadata"]["HTTPStatusCode"], "body": str(e)})
    except Exception as e:  # a connection that failed: no status, and what happened
        results.append({"status": 0, "body": f"{call['call']}: {type(e).__name__}: {e}"})
print(json.dumps(results))

"""What AWS enforces and moto does not, for tests: IAM evaluated for a role's policy, and a front
for moto on 127.0.0.1 that answers as AWS does where moto is lenient.

IAM: moto's server evaluates IAM policies once ``/moto-api/reset-auth`` sets the number of
requests left unchecked (moto's "IAM-like Access Control"; ``INITIAL_NO_AUTH_ACTION_COUNT``).
It checks the *action* of every request, but for most services against the resource ``*``
(moto/core/responses.py ``call_action``): a statement naming an ARN never matches there, so
AWS would allow what moto refuses. :func:`credentials_for_role` therefore gives a user the role's
own statements — the same actions, effects and conditions — with the resource widened to ``*``
where moto cannot check it. SQS and S3 it checks against the real ARN, so those keep theirs (the
admin function's export outside its prefix is refused); for the other services the tests check
the actions a role allows, not its resource ARNs.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import http.client
import json
import threading
import uuid
from urllib.parse import unquote, urlsplit

import boto3
import requests

from support.servers import _Quiet, _Server

# Services whose requests moto authorises against the real resource ARN.
ARN_CHECKED = ("sqs", "s3")


def _iam():
    return boto3.client("iam", region_name="us-east-1")


def role_policies(role_name: str) -> list[dict]:
    """Every statement of the role: its inline policies and its managed ones (as IAM holds them)."""
    iam = _iam()
    statements: list[dict] = []
    for name in iam.list_role_policies(RoleName=role_name)["PolicyNames"]:
        document = iam.get_role_policy(RoleName=role_name, PolicyName=name)["PolicyDocument"]
        statements += _statements(document)
    for attached in iam.list_attached_role_policies(RoleName=role_name)["AttachedPolicies"]:
        policy = iam.get_policy(PolicyArn=attached["PolicyArn"])["Policy"]
        version = iam.get_policy_version(PolicyArn=policy["Arn"],
                                         VersionId=policy["DefaultVersionId"])
        statements += _statements(version["PolicyVersion"]["Document"])
    return statements


def _statements(document) -> list[dict]:
    if isinstance(document, str):
        try:
            document = json.loads(document)
        except ValueError:  # moto's CloudFormation keeps a role's inline policy as a Python repr
            document = ast.literal_eval(document)
    found = document["Statement"]
    return [found] if isinstance(found, dict) else list(found)


def _listed(value) -> list[str]:
    return [value] if isinstance(value, str) else list(value or [])


# moto names an action by the service's signing name, where IAM's prefix differs.
SIGNING_NAMES = {"cloudwatch": "monitoring"}


def widened(statement: dict) -> dict:
    actions = _listed(statement.get("Action"))
    renamed = [f"{SIGNING_NAMES[a.split(':')[0]]}:{a.split(':', 1)[1]}" for a in actions
               if a.split(":")[0] in SIGNING_NAMES]
    if renamed:
        statement = {**statement, "Action": actions + renamed}
    if actions and all(a.split(":")[0] in ARN_CHECKED for a in actions):
        return statement
    return {**statement, "Resource": "*"}


def user_with(statements: list[dict], name: str | None = None) -> dict[str, str]:
    """A new IAM user holding exactly ``statements``; its keys as boto3 keyword arguments."""
    iam = _iam()
    name = name or f"probe-{uuid.uuid4().hex[:10]}"
    iam.create_user(UserName=name)
    iam.put_user_policy(UserName=name, PolicyName="exactly", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": statements}))
    key = iam.create_access_key(UserName=name)["AccessKey"]
    return {"aws_access_key_id": key["AccessKeyId"], "aws_secret_access_key": key["SecretAccessKey"]}


def credentials_for_role(role_name: str) -> dict[str, str]:
    """Keys of a user that may do what the role may (see the module's note on resources)."""
    return user_with([widened(s) for s in role_policies(role_name)])


def admin_credentials() -> dict[str, str]:
    return user_with([{"Effect": "Allow", "Action": "*", "Resource": "*"}], "test-admin")


def _content_hash(request, **_) -> None:
    body = request.body
    if "X-Amz-Content-SHA256" in request.headers or not isinstance(body, bytes | str | None):
        return  # S3 signs its payload's hash itself
    request.headers["X-Amz-Content-SHA256"] = hashlib.sha256(
        body if isinstance(body, bytes) else (body or "").encode()).hexdigest()


def signed_client(service: str, endpoint_url: str, keys: dict[str, str]):
    """A boto3 client whose requests carry their payload's hash as a signed header (AWS accepts
    it on every service). moto's server re-computes a GET's signature over a body made of the
    request's headers when it has no query string (moto/core/responses.py ``setup_class``) and
    refuses the signature; with the header it takes the hash as given, as AWS does."""
    made = boto3.client(service, region_name="us-east-1", endpoint_url=endpoint_url, **keys)
    made.meta.events.register_first("before-sign", _content_hash)
    return made


def role_of_function(function_name: str) -> str:
    arn = boto3.client("lambda", region_name="us-east-1").get_function_configuration(
        FunctionName=function_name)["Role"]
    return arn.rsplit("/", 1)[-1]


@contextlib.contextmanager
def iam_enforced(moto_url: str):
    """Every request to moto checked against the caller's IAM policies, until the block ends."""
    requests.post(f"{moto_url}/moto-api/reset-auth", data=b"0", timeout=10).raise_for_status()
    try:
        yield
    finally:
        requests.post(f"{moto_url}/moto-api/reset-auth", data=b"inf",
                      timeout=10).raise_for_status()


class AwsRules(_Server):
    """A front for moto that forwards every request unchanged (its signature still holds: the
    Host header goes along) but answers as AWS does where moto does not:

    - SSM ``PutParameter``: a Standard parameter's value holds at most 4,096 characters (AWS's
      ValidationException, "Standard tier parameters support a maximum parameter value of 4096
      characters");
    - Lambda ``UpdateEventSourceMapping``: ``ResourceInUseException`` while the mapping's UUID is
      in :attr:`busy_mappings` (a deploy updating it at the same moment);
    - Lambda ``Invoke`` with ``X-Amz-Invocation-Type: Event``: 202 and an empty body, the event
      queued (Lambda's Invoke reference), kept in :attr:`events` as (function, payload); moto
      would try to run the function in Docker.
    """

    SSM_LIMIT = 4096

    def __init__(self, moto_url: str):
        self.moto = urlsplit(moto_url)
        self.busy_mappings: set[str] = set()
        self.refused: list[str] = []
        self.events: list[tuple[str, dict]] = []
        self.lock = threading.Lock()
        super().__init__(self._Handler)

    class _Handler(_Quiet):
        def _refuse(self, status: int, headers: dict[str, str], body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _forward(self) -> None:
            server: AwsRules = self.server.owner
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            target = self.headers.get("X-Amz-Target", "")
            if target == "AmazonSSM.PutParameter":
                request = json.loads(body or b"{}")
                if (request.get("Tier", "Standard") == "Standard"
                        and len(request.get("Value", "")) > server.SSM_LIMIT):
                    server.refused.append("PutParameter")
                    return self._refuse(400, {"Content-Type": "application/x-amz-json-1.1"}, {
                        "__type": "ValidationException",
                        "message": "Standard tier parameters support a maximum parameter value "
                                   "of 4096 characters."})
            if self.command == "PUT" and "/event-source-mappings/" in self.path:
                mapping = self.path.split("/event-source-mappings/", 1)[1].split("?")[0]
                if mapping in server.busy_mappings:
                    server.refused.append("UpdateEventSourceMapping")
                    return self._refuse(400, {"Content-Type": "application/json",
                                              "x-amzn-ErrorType": "ResourceInUseException"}, {
                        "Type": "User", "Message": f"The resource you requested is currently in "
                                                   f"use: event source mapping {mapping}"})
            if (self.command == "POST" and self.path.endswith("/invocations")
                    and self.headers.get("X-Amz-Invocation-Type") == "Event"):
                function = unquote(self.path.split("/functions/", 1)[1].split("/")[0])
                with server.lock:
                    server.events.append((function, json.loads(body or b"{}")))
                self.send_response(202)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            connection = http.client.HTTPConnection(server.moto.hostname, server.moto.port,
                                                    timeout=60)
            try:
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("connection", "content-length")}
                connection.request(self.command, self.path, body=body, headers=headers)
                answer = connection.getresponse()
                data = answer.read()
                self.send_response(answer.status)
                for name, value in answer.getheaders():
                    if name.lower() not in ("content-length", "connection", "transfer-encoding",
                                            "server", "date"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            finally:
                connection.close()

        do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _forward


def controller_environment(stack: str = "cnsq-dev", max_tasks: int = 1) -> dict[str, str]:
    """The controller's environment, as the template sets it, read from the stack moto deployed
    (each service asked: moto's describe_stack_resource fails on a stack holding a type its
    CloudFormation skips, such as AWS::ECS::CapacityProvider)."""
    def client(service: str):
        return boto3.client(service, region_name="us-east-1")

    prefix = stack.replace("-", "")
    cluster = client("ecs").list_clusters()["clusterArns"][0]
    worker = f"{stack}-DownloadAndPredict"
    return {
        "QUEUE_URL": client("sqs").get_queue_url(QueueName=f"{prefix}TileQueue")["QueueUrl"],
        "WORKER_FUNCTION": worker,
        "MAPPING_ID": client("lambda").list_event_source_mappings(
            FunctionName=worker)["EventSourceMappings"][0]["UUID"],
        "CLUSTER": cluster,
        "SERVICE": client("ecs").list_services(cluster=cluster)["serviceArns"][0],
        "GROUP": client("autoscaling").describe_auto_scaling_groups()[
            "AutoScalingGroups"][0]["AutoScalingGroupName"],
        "TARGET_GROUP": client("elbv2").describe_target_groups()["TargetGroups"][0][
            "TargetGroupArn"],
        "GPU_NAMESPACE": f"cnsq/{stack}", "STATE_PARAMETER": f"/cnsq/{stack}/controller",
        "WORKER_TIMEOUT": "120", "MIN_TASKS": "0", "MAX_TASKS": str(max_tasks),
        "TASKS_PER_INSTANCE": "1", "IDLE_SECONDS": "900", "MAX_CONCURRENCY": "1000"}

"""Where a deployed stack's parts are: the one home of "where is this stack's …".

The tile queue and dead letter queue, the results database (its URL through RDS's secret, or
the admin function that reaches a private one), the model endpoint, the ECS cluster, the worker
Lambda and the tile endpoint with its token: read from the stack (its outputs, else its
resources, as a stack deployed before an output existed has them) and from the config, once,
when first asked. Every command asks a :class:`Deployed`; none reads outputs itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from cnsq.aws import collect
from cnsq.config import Config, Secret
from cnsq.errors import CnsqError
from cnsq.stack import logical_ids
from cnsq.stack.admin import AdminFunction
from cnsq.stack.credentials import url_from_secret
from download_and_predict.masking import register_secret
from download_and_predict.writer import managed_secret_arn


@dataclass
class Deployed:
    """A deployed stack, as the commands that run a job need it."""

    config: Config
    aws: Any
    stacks: Any
    _description: Any = field(default=None, repr=False)
    _resources: dict[str, tuple[str, str]] | None = field(default=None, repr=False)
    _database_url: str | None = field(default=None, repr=False)

    @property
    def stack_name(self) -> str:
        return self.config.stack_name

    @property
    def description(self) -> dict | None:
        """The stack as CloudFormation describes it (None: not deployed), read once."""
        if self._description is None:
            self._description = self.stacks.describe(self.stack_name) or {}
        return self._description or None

    @property
    def status(self) -> str | None:
        return self.description["StackStatus"] if self.description else None

    @property
    def outputs(self) -> dict[str, str]:
        return {o["OutputKey"]: o["OutputValue"]
                for o in (self.description or {}).get("Outputs", [])}

    def require(self) -> None:
        """Raises CnsqError when the stack does not exist."""
        if self.description is None:
            raise CnsqError(f"stack '{self.stack_name}' does not exist (deploy it with "
                            "`cnsq deploy`)")

    @property
    def resources(self) -> dict[str, tuple[str, str]]:
        """Logical id → (type, physical id), read once."""
        if self._resources is None:
            self._resources = {lid: (kind, pid)
                               for lid, kind, pid in self.stacks.resources(self.stack_name)}
        return self._resources

    def _output_or_resource(self, output: str, logical_id: str) -> str | None:
        if self.outputs.get(output):
            return self.outputs[output]
        if self.description is None:
            return None
        return self.resources.get(logical_id, ("", ""))[1] or None

    # -- the parts -----------------------------------------------------------------------------

    @property
    def queue_url(self) -> str | None:
        return self._output_or_resource(logical_ids.QUEUE_URL,
                                        logical_ids.tile_queue(self.config.values["stackNoDash"]))

    @property
    def dead_letter_url(self) -> str | None:
        return self._output_or_resource(logical_ids.DEAD_LETTER_URL,
                                        logical_ids.dead_letter_queue(self.config.values["stackNoDash"]))

    def require_queue_url(self) -> str:
        """The tile queue's URL; raises CnsqError naming what is missing."""
        self.require()
        if not self.queue_url:
            raise CnsqError(f"stack {self.stack_name} has no queueURL output yet; pass the "
                            "queue URL")
        return self.queue_url

    @property
    def controller_function(self) -> str | None:
        """The controller's function name (None: the stack has none, a fixed size)."""
        return self._output_or_resource(
            logical_ids.CONTROLLER_FUNCTION,
            logical_ids.controller_function(self.config.values["stackNoDash"]))

    @property
    def model_endpoint(self) -> str | None:
        """``…/v1/models/NAME`` on the internal load balancer (reachable inside the VPC)."""
        return self.outputs.get(logical_ids.MODEL_ENDPOINT)

    @property
    def cluster(self) -> str:
        """The ECS cluster's name; raises CnsqError when the stack has none."""
        if self.outputs.get(logical_ids.ECS_CLUSTER):
            return self.outputs[logical_ids.ECS_CLUSTER].rsplit("/", 1)[-1]
        for kind, physical in self.resources.values():
            if kind == "AWS::ECS::Cluster" and physical:
                return physical.rsplit("/", 1)[-1]
        raise CnsqError(f"stack {self.stack_name} has no ECS cluster")

    @property
    def worker(self) -> dict[str, Any] | None:
        """The config of the Lambda that works the queue (its ``fullName``, ``timeout`` …)."""
        name = logical_ids.worker_lambda(self.config.values["lambdas"])
        return self.config.values["lambdas"][name] if name else None

    @property
    def batch_size(self) -> int:
        """Records per invocation, as the event source mapping hands them to the worker."""
        return self.config.values["sqs"]["batchSize"]

    @property
    def tile_endpoint(self) -> tuple[str | None, str | None]:
        """The worker's TILE_ENDPOINT and TILE_ACCESS_TOKEN in the config (the token registered
        as a secret, so no message shows it)."""

        template, token = None, None
        for spec in self.config.values["lambdas"].values():
            envs = spec["envs"]
            if template is None and isinstance(envs.get("TILE_ENDPOINT"), str):
                template = envs["TILE_ENDPOINT"]
            value = envs.get("TILE_ACCESS_TOKEN")
            if value is not None and token is None:
                token = value.value if isinstance(value, Secret) else value
                register_secret(token)
        return template, token

    @property
    def admin(self):
        """The stack's admin function (migrations, counts and exports inside the VPC), or None
        for a stack deployed before it."""

        return AdminFunction.of_stack(self.aws, self.outputs)

    @property
    def has_database_url(self) -> bool:
        """Whether :meth:`database_url` can answer (a database reachable from here)."""
        return logical_ids.DB_SECRET_ARN in self.outputs or logical_ids.DB_INSTANCE in self.outputs

    def database_url(self) -> str:
        """The results database's URL, with the credentials of RDS's own secret for the
        ``dbInstanceIdentifier`` output (host and port from the instance), or from the
        ``databaseSecretArn`` of a stack deployed before cnsq 0.3; read once.

        Raises:
            CnsqError: the stack names no database.
        """
        if self._database_url is None:
            self._database_url = self._read_database_url()
        return self._database_url

    def _read_database_url(self) -> str:
        outputs = self.outputs
        instance, arn = outputs.get(logical_ids.DB_INSTANCE), outputs.get(logical_ids.DB_SECRET_ARN)
        if not instance and not arn:
            raise CnsqError(f"stack {self.stack_name} has no dbInstanceIdentifier output; pass "
                            "the database URL explicitly")
        where: dict = {}
        if instance:
            rds = self.aws.client("rds")
            try:
                arn = managed_secret_arn(rds, instance)
            except LookupError as exc:
                raise CnsqError(str(exc)) from None
            found = collect(rds, "describe_db_instances", "DBInstances",
                            DBInstanceIdentifier=instance)
            endpoint = found[0].get("Endpoint") or {}
            where = {"host": endpoint.get("Address"), "port": endpoint.get("Port", 5432),
                     "dbname": "ResultsDB"}
        value = self.aws.client("secretsmanager").get_secret_value(SecretId=arn)
        return url_from_secret({**json.loads(value["SecretString"]), **where})

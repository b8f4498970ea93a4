"""The stack's logical ids, output keys and parameter names, as
templates/cloudformation.template.yml writes them, and which Lambda is the worker: the one place
cnsq's commands learn them from."""

from __future__ import annotations

from typing import Any

# Output keys (the original's first three; the rest cnsq's).
DB_CONNECTION = "dbConnectionString"
DB_INSTANCE = "dbInstanceIdentifier"
DB_SECRET_ARN = "databaseSecretArn"  # stacks deployed before the RDS-managed password
ADMIN_FUNCTION = "adminFunctionName"
QUEUE_URL = "queueURL"
DEAD_LETTER_URL = "deadLetterQueueURL"
MODEL_ENDPOINT = "modelEndpoint"
ECS_CLUSTER = "ecsCluster"
DOCKER_LOG_GROUP = "dockerLogGroup"
CONTROLLER_FUNCTION = "controllerFunctionName"  # stacks with ecs.minInstances only


def tile_queue(stack_no_dash: str) -> str:
    return f"{stack_no_dash}TileQueue"


def dead_letter_queue(stack_no_dash: str) -> str:
    return f"{stack_no_dash}DeadLetterQueue"


def load_balancer(stack_no_dash: str) -> str:
    return f"{stack_no_dash}LoadBalancer"


def autoscaling_group(stack_no_dash: str) -> str:
    return f"{stack_no_dash}ECSAutoScalingGroup"


def controller_function(stack_no_dash: str) -> str:
    return f"{stack_no_dash}ControllerFunction"


def controller_state(stack_name: str) -> str:
    """The SSM parameter where the controller keeps its state and last decisions."""
    return f"/cnsq/{stack_name}/controller"


def results_db(stack_no_dash: str) -> str:
    return f"{stack_no_dash}ResultsDB"


def lambda_function(name: str) -> str:
    return f"{name}LambdaFunction"


def lambda_log_group(name: str) -> str:
    """The original's id for a Lambda's log group (kept so a kes stack updates in place)."""
    return f"{name}LambdaFunctionLogGroup"


def worker_lambda(lambdas: dict[str, Any]) -> str | None:
    """The Lambda that works the queue: the first with ``queueTrigger``, else the first one.
    The admin function runs from its zip; status reads its metrics."""
    names = list(lambdas)
    triggered = [n for n in names if lambdas[n].get("queueTrigger")]
    chosen = triggered or names
    return chosen[0] if chosen else None

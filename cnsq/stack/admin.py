"""The stack's admin function, called from the operator's machine (docs/architecture.md §8).

The results database is private: `cnsq setup`, `cnsq download` and the end of `cnsq deploy` ask
the admin function, which runs in the VPC, instead of connecting. Where the function cannot run
(an emulator without a Lambda runtime, a missing permission), the error says what was not done
and which command does it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cnsq.aws import Client
from cnsq.errors import CnsqError
from cnsq.files import atomic_write
from cnsq.stack import logical_ids

OUTPUT = logical_ids.ADMIN_FUNCTION


class AdminUnavailable(CnsqError):
    """The admin function could not be invoked (it was not the database that failed)."""


class AdminFunction:
    """``invoke`` of the stack's admin function; ``lambda_client`` and ``s3`` are boto3 clients."""

    def __init__(self, name: str, lambda_client: Client, s3: Client | None = None):
        self.name = name
        self.lambda_client = lambda_client
        self.s3 = s3

    @classmethod
    def of_stack(cls, aws: Any, outputs: dict[str, str]) -> AdminFunction | None:
        """The stack's admin function, or None for a stack deployed before it existed."""
        name = outputs.get(OUTPUT)
        if not name:
            return None
        # Exports and migrations of a large table take minutes: wait as long as Lambda allows.
        return cls(name, aws.client("lambda", read_timeout=910, retries={"max_attempts": 0}),
                   aws.client("s3"))

    def call(self, action: str) -> dict[str, Any]:
        """Invoke synchronously and return the function's answer.

        Raises:
            AdminUnavailable: the invoke itself failed (no runtime, no permission, timeout).
            CnsqError: the function ran and reported an error.
        """
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            response = self.lambda_client.invoke(
                FunctionName=self.name, InvocationType="RequestResponse",
                Payload=json.dumps({"action": action}).encode())
            payload = response["Payload"].read()
        except (ClientError, BotoCoreError) as exc:
            raise AdminUnavailable(f"cannot invoke the admin function {self.name}: {exc}") from None
        try:
            answer = json.loads(payload or b"null")
        except ValueError:
            answer = None
        if response.get("FunctionError") or not isinstance(answer, dict):
            detail = answer.get("errorMessage") if isinstance(answer, dict) else payload[:200]
            raise AdminUnavailable(f"the admin function {self.name} failed: {detail}")
        if "error" in answer:
            raise CnsqError(f"the admin function {self.name}: {answer['error']}")
        return answer

    def download_export(self, target: str, progress: Callable[[int], None] | None = None) -> dict:
        """Export the table to S3 through the function, then copy it to ``target``.

        The copy goes to a temporary name beside the target and is renamed at the end.
        """
        export = self.call("export")
        done = [0]

        def count(chunk: int) -> None:
            done[0] += chunk
            if progress:
                progress(done[0])

        if self.s3 is None:
            raise CnsqError(f"the admin function {self.name} was given no S3 client to copy its export")
        with atomic_write(Path(target), "wb") as handle:
            self.s3.download_fileobj(export["bucket"], export["key"], handle, Callback=count)
        return export

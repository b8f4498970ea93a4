"""cnsq's boto3 sessions (cnsq.aws): each command's own, over one botocore data loader per
process, so that a service's model is parsed once however many sessions ask for it."""

from __future__ import annotations

import pytest

from cnsq import aws
from cnsq.errors import AwsError


def test_sessions_share_the_parsed_models_and_keep_their_own_settings(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    east, west = aws.Aws(region="us-east-1").session, aws.Aws(region="eu-west-1").session
    assert east is not west
    assert east.region_name == "us-east-1" and west.region_name == "eu-west-1"
    first = east.client("sqs").meta.service_model
    again = west.client("sqs").meta.service_model
    # The same parsed model under both sessions' clients: the JSON was read once.
    assert first._service_description is again._service_description
    paths = aws._loader.search_paths
    assert len(paths) == len(set(paths)), paths  # boto3's folder added once, not per session


def test_a_missing_profile_is_still_a_clear_error(monkeypatch, tmp_path):
    config = tmp_path / "config"
    config.write_text("[profile real]\nregion = us-east-1\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    assert aws.Aws(profile="real").session  # the shared loader exists before the failing one
    with pytest.raises(AwsError, match="AWS profile 'nope' is not in your AWS config"):
        assert aws.Aws(profile="nope").session

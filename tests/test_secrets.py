"""No secret in the terminal or the logs: every failing path that can carry a URL or a value from
.env goes through one redaction function (download_and_predict.base.mask), and known secrets are
grepped for in every output."""

from __future__ import annotations

import logging

import pytest
from click.testing import CliRunner
from conftest import free_port
from servers import ModelServer

from cnsq.cli import main
from cnsq.verify import Target, run_checks
from download_and_predict import handler as handler_module
from download_and_predict.base import mask

TOKEN = "tok-8JmX-never-print"
PASSWORD = "p@ss%w0rd-never-print"


@pytest.mark.parametrize("text, hidden", [
    (f"https://tiles.example.com/1/2/3.png?access_token={TOKEN}", TOKEN),
    (f"https://tiles.example.com/1/2/3.png?x=1&key={TOKEN}#f", TOKEN),
    (f"GET https://s3.amazonaws.com/b/k?X-Amz-Signature={TOKEN}&X-Amz-Credential=abc failed", TOKEN),
    (f"postgresql://admin:{PASSWORD}@db.example.com:5432/ResultsDB", PASSWORD),
    (f"could not connect to postgresql://admin:{PASSWORD}@10.0.0.1/db: refused", PASSWORD),
])
def test_mask_hides_tokens_and_passwords(text, hidden):
    masked = mask(text)
    assert hidden not in masked and "***" in masked
    assert "ss%w0rd" not in masked


def test_verify_never_prints_the_tile_token_of_an_unreachable_host():
    port = free_port()
    target = Target(stack_name="s", stack_status="CREATE_COMPLETE", queue_url=None,
                    dead_letter_url=None, database_url=None, model_endpoint=None,
                    tile_url=f"http://127.0.0.1:{port}/3/1/2.png?access_token={TOKEN}", tile_id="1-2-3")
    checks = run_checks(target, sqs=None, timeout=2)
    imagery = [c for c in checks if c.name == "imagery"][0]
    assert not imagery.ok and str(port) in imagery.detail and "access_token=***" in imagery.detail
    assert all(TOKEN not in c.detail for c in checks)


@pytest.mark.parametrize("endpoint", [
    "tiles.example.com/{z}/{x}/{y}.png?access_token={token}",          # no scheme
    "http://127.0.0.1:{port}/{z}/{x}/{y}.png?access_token={token}",     # nothing listening
])
def test_the_lambda_never_logs_the_token(endpoint, caplog):
    model = ModelServer()
    try:
        env = {"TILE_ENDPOINT": endpoint.replace("{port}", str(free_port())),
               "TILE_ACCESS_TOKEN": TOKEN, "PREDICTION_ENDPOINT": model.endpoint,
               "DATABASE_URL": "sqlite:///:memory:", "RETRIES": "1"}
        app = handler_module.build(env)
        with caplog.at_level(logging.INFO, logger="download_and_predict"):
            result = app.run({"Records": [{"messageId": "m0", "body": '{"x": 1, "y": 2, "z": 3}'}]})
    finally:
        model.close()
    assert result == {"batchItemFailures": [{"itemIdentifier": "m0"}]}
    assert caplog.text and TOKEN not in caplog.text


def test_a_malformed_env_line_does_not_echo_its_value(tmp_path):
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.yml").write_text("default:\n  stackName: s\n")
    (tmp_path / "config" / ".env").write_text(f"RDS_USERNAME=postgres\nTILE_ACCESS_TOKEN: {TOKEN}\n")
    result = CliRunner().invoke(main, ["compile", "--config", str(tmp_path / "config" / "config.yml")])
    assert result.exit_code == 1
    assert ".env:2: expected KEY=value (the line starts with 'TILE_ACCESS_TOKEN')" in result.stderr
    assert TOKEN not in result.output


def test_a_database_url_with_an_unencoded_at_is_masked_in_errors():
    port = free_port()
    result = CliRunner().invoke(main, ["setup", f"postgresql://admin:{PASSWORD}@127.0.0.1:{port}/db"])
    assert result.exit_code == 1
    assert "ss%w0rd" not in result.output and "p@ss" not in result.output

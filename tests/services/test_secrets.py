"""No secret in the terminal or the logs: every failing path that can carry a URL or a value from
.env goes through one redaction function (download_and_predict.base.mask), and known secrets are
grepped for in every output."""

from __future__ import annotations

import json
import logging

import pytest
from click.testing import CliRunner

from cnsq.cli import main
from cnsq.ops.verify import Target, run_checks
from download_and_predict import handler as handler_module
from download_and_predict.base import mask
from support.servers import ModelServer, free_port

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


# Every character a URL, a query or a connection string treats specially.
SPECIAL = ["&", "#", "?", "/", "@", ":", ";", "=", "+", "%", " ", "'", '"', "\\", "{", "}"]


@pytest.mark.parametrize("char", SPECIAL)
def test_a_registered_token_is_masked_in_every_form(char):
    from urllib.parse import quote, quote_plus

    from download_and_predict.masking import register_secret

    token = f"tokA{char}def=SECRETTAIL{char}z"
    register_secret(token)
    for form in (token, quote(token, safe=""), quote_plus(token), json.dumps(token)[1:-1], repr(token)[1:-1]):
        for text in (f"GET https://tiles.example.com/1/2/3.png?access_token={form} failed",
                     f"https://tiles.example.com/1/2/3.png?access-token={form}&x=1",
                     f"error: {form}"):
            masked = mask(text)
            assert "SECRETTAIL" not in masked and "tokA" not in masked, (form, masked)


@pytest.mark.parametrize("name", ["access_token", "access-token", "accessToken", "api_key", "apiKey",
                                  "X-Amz-Signature", "sig", "client_secret", "auth"])
def test_a_credential_parameter_is_masked_whatever_its_name(name):
    masked = mask(f"https://tiles.example.com/1/2/3.png?{name}=UNREGISTERED1234&z=1")
    assert "UNREGISTERED1234" not in masked and "z=1" in masked


@pytest.mark.parametrize("char", SPECIAL)
def test_a_database_password_is_masked_in_every_connection_string_form(char):
    from urllib.parse import quote

    from download_and_predict.masking import register_connection_string

    password = f"pwA{char}MIDDLEPART{char}ENDPART"
    libpq_quoted = password.replace("\\", "\\\\").replace("'", "\\'")
    for dsn in (f"postgresql://admin:{quote(password, safe='')}@db.example.com:5432/ResultsDB",
                f"postgresql://:{quote(password, safe='')}@db.example.com/ResultsDB",
                f"host=db.example.com user=admin password='{libpq_quoted}' dbname=ResultsDB"):
        register_connection_string(dsn)
        masked = mask(f"could not connect with {dsn}: refused")
        assert "MIDDLEPART" not in masked and "ENDPART" not in masked, masked


def test_an_unencoded_password_is_masked_as_written():
    for dsn in ("postgresql://admin:pwB/MIDDLE?PART#END@db.example.com/db",
                "postgresql://:pwC/MIDDLEPART@db.example.com/db"):
        masked = mask(f"failed: {dsn}")
        assert "MIDDLE" not in masked and "PART" not in masked, masked


@pytest.mark.parametrize("password", ["pa/XQ7vk-Zq81", "pa?XQ7vk-Zq81", "pa#XQ7vk-Zq81", "p@XQ7vk-Zq81"])
def test_a_database_url_with_a_reserved_character_is_refused_without_echoing_it(password):
    result = CliRunner().invoke(main, ["setup", f"postgresql://admin:{password}@127.0.0.1:1/db"])
    assert result.exit_code == 1
    assert "percent-encode" in result.stderr or "percent-encoded" in result.stderr, result.output
    for piece in ("XQ7vk", "Zq81"):
        assert piece not in result.output

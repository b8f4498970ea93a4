"""The DownloadAndPredict handler against real PostgreSQL and real HTTP servers on 127.0.0.1,
called with real SQS-shaped events. Each bad input fails exactly its own records; every other
tile's row is in the database with the model's output for that tile's image."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import psycopg2
import pytest

from support.servers import (
    ForwardProxy,
    ModelServer,
    PostgresCluster,
    Redirector,
    TcpProxy,
    TileServer,
    free_port,
    fresh_database,
    score,
    self_signed_tls,
    tile_image,
)

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "lambda"))

from cnsq.results.store import open_store  # noqa: E402
from download_and_predict import handler as handler_module  # noqa: E402
from download_and_predict.base import BadRecord, Settings, Tile, imagery_url, parse_tile  # noqa: E402
from download_and_predict.http import Http, proxies_from_env  # noqa: E402


def sqs_event(bodies: list[str]) -> dict:
    return {"Records": [{
        "messageId": f"m{i}", "receiptHandle": f"rh{i}", "body": body,
        "attributes": {"ApproximateReceiveCount": "1", "SentTimestamp": "1700000000000"},
        "messageAttributes": {}, "md5OfBody": "", "eventSource": "aws:sqs",
        "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:TileQueue", "awsRegion": "us-east-1",
    } for i, body in enumerate(bodies)]}


def body(x: int, y: int, z: int) -> str:
    return json.dumps({"x": x, "y": y, "z": z})


def failures(result: dict) -> set[str]:
    return {item["itemIdentifier"] for item in result["batchItemFailures"]}


@pytest.fixture
def db_url(postgres_url):
    """A fresh database with the results table, for one test."""
    url = fresh_database(postgres_url)
    store = open_store(url)
    store.migrate()
    store.close()
    return url


def rows(url: str) -> dict[str, list[float]]:
    conn = psycopg2.connect(url)
    with conn.cursor() as cur:
        cur.execute("SELECT tile, output FROM results")
        found = dict(cur.fetchall())
    conn.close()
    return found


def expected(*tiles: tuple[int, int, int]) -> dict[str, list[float]]:
    return {f"{x}-{y}-{z}": score(tile_image(x, y, z)) for x, y, z in tiles}


@pytest.fixture
def tiles():
    server = TileServer()
    yield server
    server.close()


@pytest.fixture
def model():
    server = ModelServer()
    yield server
    server.close()


@pytest.fixture
def make_app(tiles, model, db_url):
    def make(**overrides):
        env = {"TILE_ENDPOINT": tiles.url + "/{z}/{x}/{y}.jpg", "PREDICTION_ENDPOINT": model.endpoint,
               "DATABASE_URL": db_url, "RETRY_BACKOFF": "0.01"}
        env.update({k: str(v) for k, v in overrides.items()})
        return handler_module.build(env)

    return make


GOOD = [(1, 2, 3), (5, 6, 4), (0, 0, 0)]


def test_good_batch_is_written_with_one_predict_call(make_app, model, db_url):
    result = make_app().run(sqs_event([body(*t) for t in GOOD]))
    assert result == {"batchItemFailures": []}
    assert rows(db_url) == expected(*GOOD)
    assert model.batches == [3]


def test_a_poison_body_fails_alone(make_app, db_url):
    """2 KB of nested brackets raised RecursionError out of the handler, failing all ten."""
    poison = "[" * 1000 + "]" * 1000
    good = [(i, i, 5) for i in range(9)]
    result = make_app().run(sqs_event([poison] + [body(*t) for t in good]))
    assert failures(result) == {"m0"}
    assert rows(db_url) == expected(*good)


@pytest.mark.parametrize("mode", ["nan_first", "inf_first", "nul_first", "surrogate_first"])
def test_a_prediction_that_is_not_json_fails_its_own_record(make_app, model, db_url, mode):
    """One NaN made jsonb refuse the batched upsert: every record failed with `database`."""
    model.mode = mode
    outcome = make_app().process(sqs_event([body(*t) for t in GOOD]))
    assert outcome.failed == {"m0": "model_output"}
    assert rows(db_url) == expected(*GOOD[1:])


def test_a_row_the_database_refuses_fails_alone(make_app, db_url):
    """Whatever PostgreSQL refuses in one row (here a trigger refusing one tile), the batch's
    other rows are written: the batch is written again row by row."""
    conn = psycopg2.connect(db_url)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("""CREATE FUNCTION refuse() RETURNS trigger AS $$ BEGIN
                         IF NEW.tile = '5-6-4' THEN RAISE EXCEPTION 'refused' USING ERRCODE = '22023';
                         END IF; RETURN NEW; END $$ LANGUAGE plpgsql""")
        cur.execute("CREATE TRIGGER refuse BEFORE INSERT ON results FOR EACH ROW EXECUTE FUNCTION refuse()")
    conn.close()
    outcome = make_app().process(sqs_event([body(*t) for t in GOOD]))
    assert outcome.failed == {"m1": "database"}
    assert rows(db_url) == expected(GOOD[0], GOOD[2])


def test_an_answer_nested_100000_deep_fails_its_chunk(make_app, model, db_url):
    model.mode = "deep"
    outcome = make_app().process(sqs_event([body(*t) for t in GOOD]))
    assert outcome.failed == {"m0": "model_error", "m1": "model_error", "m2": "model_error"}


@pytest.mark.parametrize("event, message", [
    ({"Records": None}, "got dict with Records NoneType"),
    ([{"body": "{}"}], "got list"),
    ({"Records": ["not an object"]}, "record 0 is not an object but str"),
    ("text", "got str"),
])
def test_an_event_that_is_not_sqs_is_a_clear_error(make_app, event, message):
    from download_and_predict.errors import BadEvent

    with pytest.raises(BadEvent, match=message):
        make_app().run(event)


def test_a_tile_that_is_not_an_image_fails_alone(make_app, model, db_url, tiles):
    """An HTML quota page served with 200 went to the model and failed its whole chunk."""
    tiles.content["1-2-3"] = b"<html><body>Quota exceeded</body></html>"
    outcome = make_app().process(sqs_event([body(*t) for t in GOOD]))
    assert outcome.failed == {"m0": "not_an_image"}
    assert rows(db_url) == expected(*GOOD[1:])
    assert model.batches == [2]


def test_keys_in_another_order_predict_the_right_tile(make_app, db_url, tiles):
    result = make_app().run(sqs_event(['{"z": 3, "y": 2, "x": 1}', body(5, 6, 4)]))
    assert failures(result) == set()
    assert rows(db_url) == expected((1, 2, 3), (5, 6, 4))
    assert tiles.requests["1-2-3"] == 1 and tiles.requests["2-1-3"] == 0


@pytest.mark.parametrize("bad", [
    '{"x": 1, "y": 2}',                       # a missing key
    '{"x": "1", "y": 2, "z": 3}',             # a string
    '{"x": 1.5, "y": 2, "z": 3}',             # a float
    '{"x": true, "y": 0, "z": 1}',            # a boolean is not an integer
    '{"x": 8, "y": 0, "z": 3}',               # x outside 0..2^z-1
    '{"x": 0, "y": -1, "z": 3}',              # y negative
    '{"x": 0, "y": 0, "z": 31}',              # z outside 0..30
    "1-2-3",                                  # not JSON (the tiles.txt line format)
    "[1, 2, 3]",                              # JSON, not an object
    "",                                       # empty body
])
def test_a_bad_record_fails_alone(make_app, db_url, bad):
    result = make_app().run(sqs_event([body(1, 2, 3), bad, body(5, 6, 4)]))
    assert failures(result) == {"m1"}
    assert rows(db_url) == expected((1, 2, 3), (5, 6, 4))


def test_missing_tile_is_skipped_by_default_and_not_retried(make_app, db_url, tiles):
    tiles.missing.add("5-6-4")
    outcome = make_app().process(sqs_event([body(1, 2, 3), body(5, 6, 4)]))
    assert outcome.failed == {}
    assert rows(db_url) == expected((1, 2, 3))
    assert tiles.requests["5-6-4"] == 1
    assert outcome.log_line()["skipped_missing"] == 1


def test_missing_tile_fails_with_missing_tiles_fail(make_app, db_url, tiles):
    tiles.missing.add("5-6-4")
    result = make_app(MISSING_TILES="fail").run(sqs_event([body(1, 2, 3), body(5, 6, 4)]))
    assert failures(result) == {"m1"}
    assert rows(db_url) == expected((1, 2, 3))


def test_tile_answering_500_twice_then_200_succeeds(make_app, db_url, tiles):
    tiles.failures["5-6-4"] = 2
    result = make_app().run(sqs_event([body(1, 2, 3), body(5, 6, 4)]))
    assert failures(result) == set()
    assert rows(db_url) == expected((1, 2, 3), (5, 6, 4))
    assert tiles.requests["5-6-4"] == 3


def test_tile_failing_more_than_the_retries_fails_alone(make_app, db_url, tiles):
    tiles.failures["5-6-4"] = 5
    result = make_app(RETRIES=3).run(sqs_event([body(1, 2, 3), body(5, 6, 4)]))
    assert failures(result) == {"m1"}
    assert rows(db_url) == expected((1, 2, 3))


def test_tile_that_times_out_fails_alone(make_app, db_url, tiles):
    tiles.slow["5-6-4"] = 1.0
    outcome = make_app(TILE_TIMEOUT=0.2, RETRIES=2).process(sqs_event([body(1, 2, 3), body(5, 6, 4)]))
    assert outcome.failed == {"m1": "tile_timeout"}
    assert rows(db_url) == expected((1, 2, 3))


def test_model_answering_500_fails_every_record_it_was_asked_about(make_app, db_url, model):
    model.mode = "error"
    result = make_app().run(sqs_event([body(1, 2, 3), "bad", body(5, 6, 4)]))
    assert failures(result) == {"m0", "m1", "m2"}
    assert rows(db_url) == {}
    assert len(model.batches) == 3  # retried with backoff


def test_model_recovering_within_the_retries(make_app, db_url, model):
    model.fail_times = 1
    result = make_app().run(sqs_event([body(1, 2, 3)]))
    assert failures(result) == set()
    assert rows(db_url) == expected((1, 2, 3))


def test_wrong_number_of_predictions_fails_those_records(make_app, db_url, model):
    model.mode = "wrong_count"
    outcome = make_app().process(sqs_event([body(1, 2, 3), body(5, 6, 4)]))
    assert outcome.failed == {"m0": "prediction_count", "m1": "prediction_count"}
    assert rows(db_url) == {}


def test_chunks_of_max_instances_fail_independently(make_app, db_url, model):
    model.mode = "wrong_count"
    tiles_ = [(i, 0, 4) for i in range(5)]
    result = make_app(MAX_INSTANCES=2).run(sqs_event([body(*t) for t in tiles_]))
    assert model.batches == [2, 2, 1]
    assert len(failures(result)) == 5  # every chunk came back one short


def test_duplicate_tile_in_one_batch_is_written_once(make_app, db_url):
    result = make_app().run(sqs_event([body(1, 2, 3), body(1, 2, 3)]))
    assert failures(result) == set()
    assert rows(db_url) == expected((1, 2, 3))


def test_upsert_replaces_an_earlier_output(make_app, db_url):
    store = open_store(db_url)
    store.upsert([("1-2-3", [9, 9])])
    store.close()
    make_app().run(sqs_event([body(1, 2, 3)]))
    assert rows(db_url) == expected((1, 2, 3))


@pytest.fixture
def proxy(db_url):
    parsed = urlparse(db_url)
    tcp = TcpProxy(parsed.hostname, parsed.port)
    yield tcp, db_url.replace(f":{parsed.port}/", f":{tcp.port}/")
    tcp.stop()


def test_database_down_at_cold_start_fails_the_batch_then_recovers(make_app, db_url, proxy):
    tcp, via_proxy = proxy  # not started: connections are refused
    app = make_app(DATABASE_URL=via_proxy)
    first = app.run(sqs_event([body(1, 2, 3), "bad"]))
    assert failures(first) == {"m0", "m1"}
    assert rows(db_url) == {}
    tcp.start()  # the database is back: the next invocation connects and writes
    second = app.run(sqs_event([body(5, 6, 4)]))
    assert failures(second) == set()
    assert rows(db_url) == expected((5, 6, 4))


def test_connection_dropped_between_warm_invocations_reconnects_once(make_app, db_url, proxy):
    tcp, via_proxy = proxy
    tcp.start()
    app = make_app(DATABASE_URL=via_proxy)
    assert failures(app.run(sqs_event([body(1, 2, 3)]))) == set()
    first_connection = app.writer.conn
    tcp.drop_all()
    assert failures(app.run(sqs_event([body(5, 6, 4)]))) == set()
    assert app.writer.conn is not first_connection
    assert rows(db_url) == expected((1, 2, 3), (5, 6, 4))


def test_password_is_never_logged(make_app, db_url, proxy, caplog):
    tcp, via_proxy = proxy
    secret_url = via_proxy.replace("cnsq@", "cnsq:pw-Zq81-never-print@")
    app = make_app(DATABASE_URL=secret_url)
    app.run(sqs_event([body(1, 2, 3)]))
    assert "pw-Zq81-never-print" not in caplog.text
    assert "database" in caplog.text


def test_log_line_counts_records_and_times_steps(make_app, caplog):
    caplog.set_level("INFO", logger="download_and_predict")
    make_app().run(sqs_event([body(1, 2, 3), "bad"]))
    line = json.loads([r.message for r in caplog.records if r.message.startswith("{")][-1])
    assert line["records"] == 2 and line["succeeded"] == 1 and line["failed"] == {"bad_record": 1}
    assert set(line["seconds"]) == {"download", "predict", "write"}


def test_handler_reads_the_environment_at_cold_start(monkeypatch, tiles, model, db_url):
    for key, value in {"TILE_ENDPOINT": tiles.url + "/{}/{}/{}.jpg?access_token={}",
                       "TILE_ACCESS_TOKEN": "tok", "PREDICTION_ENDPOINT": model.endpoint,
                       "DATABASE_URL": db_url}.items():
        monkeypatch.setenv(key, value)
    handler = handler_module.make_handler()  # a cold start
    result = handler(sqs_event([body(1, 2, 3)]), None)
    assert failures(result) == set()
    assert tiles.tokens == ["tok"]  # the original's positional form: z, x, y, token
    assert rows(db_url) == expected((1, 2, 3))


def test_missing_environment_is_a_clear_error_at_cold_start():
    with pytest.raises(ValueError, match=r"missing environment variable\(s\): PREDICTION_ENDPOINT, "
                                         r"DATABASE_URL or DATABASE_INSTANCE"):
        Settings.from_env({"TILE_ENDPOINT": "http://x/{z}/{x}/{y}"})


def test_credentials_from_secrets_manager(aws, tiles, model, db_url):
    import boto3

    parsed = urlparse(db_url)
    secret = {"username": "cnsq", "password": "", "host": parsed.hostname, "port": parsed.port,
              "dbname": parsed.path.lstrip("/"), "engine": "postgres"}
    arn = boto3.client("secretsmanager", region_name="us-east-1").create_secret(
        Name="results-db", SecretString=json.dumps(secret))["ARN"]
    app = handler_module.build({"TILE_ENDPOINT": tiles.url + "/{z}/{x}/{y}.jpg",
                                "PREDICTION_ENDPOINT": model.endpoint, "DATABASE_SECRET_ARN": arn,
                                "DATABASE_SSLMODE": "disable"})
    assert failures(app.run(sqs_event([body(1, 2, 3)]))) == set()
    assert rows(db_url) == expected((1, 2, 3))


def test_credentials_from_the_rds_managed_secret_and_the_token_from_its_secret(
        aws, tiles, model, db_url):
    """As the stack runs it: the instance's RDS-managed secret (found through DescribeDBInstances)
    gives the user and password, the environment the host and port; the tile token comes from
    its own secret, never from a plaintext variable."""
    import boto3

    parsed = urlparse(db_url)
    rds = boto3.client("rds", region_name="us-east-1")
    rds.create_db_instance(DBInstanceIdentifier="results", Engine="postgres", EngineVersion="18",
                           DBInstanceClass="db.t3.medium", MasterUsername=parsed.username,
                           ManageMasterUserPassword=True, AllocatedStorage=20)
    # RDS's secret is {"username": <master user>, "password": …}; moto's names "admin".
    secrets = boto3.client("secretsmanager", region_name="us-east-1")
    managed = handler_module.managed_secret_arn(rds, "results")
    secrets.put_secret_value(SecretId=managed, SecretString=json.dumps(
        {"username": parsed.username, "password": "generated-by-rds"}))
    token = secrets.create_secret(
        Name="tile-token", SecretString="tok-from-secret")["ARN"]
    env = {"TILE_ENDPOINT": tiles.url + "/{z}/{x}/{y}.jpg?access_token={token}",
           "TILE_ACCESS_TOKEN_SECRET_ARN": token, "PREDICTION_ENDPOINT": model.endpoint,
           "DATABASE_INSTANCE": "results", "DATABASE_HOST": parsed.hostname,
           "DATABASE_PORT": str(parsed.port), "DATABASE_NAME": parsed.path.lstrip("/"),
           "DATABASE_SSLMODE": "disable"}  # the throwaway cluster has no TLS; the stack: require
    settings = Settings.from_env(handler_module.resolve_secret_envs(env))
    assert settings.tile_token == "tok-from-secret"
    url = handler_module.database_url(settings)
    assert url.startswith(f"postgresql://{parsed.username}:") and url.endswith("?sslmode=disable"), handler_module.mask(url)
    app = handler_module.build(env)
    assert failures(app.run(sqs_event([body(1, 2, 3)]))) == set()
    assert rows(db_url) == expected((1, 2, 3))
    assert tiles.tokens == ["tok-from-secret"]


@pytest.fixture(scope="module")
def scram_server(tmp_path_factory):
    """A PostgreSQL server that checks every password (scram-sha-256), as RDS does."""
    cluster = PostgresCluster(tmp_path_factory.mktemp("scram"), password="admin-Pw0").start()
    yield cluster
    cluster.stop()


def test_a_rotated_password_is_read_again_and_every_record_written(aws, tiles, model, scram_server):
    """RDS rotates the managed master password every 7 days. A warm worker whose connection
    drops after a rotation reads the secret again and reconnects once: no record is lost."""
    import boto3

    admin = psycopg2.connect(scram_server.url)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute("CREATE ROLE worker LOGIN PASSWORD 'first-Pw1'")
        cur.execute("CREATE DATABASE rotation OWNER worker")
    db = f"postgresql://worker:first-Pw1@127.0.0.1:{scram_server.port}/rotation"
    store = open_store(db)
    store.migrate()
    store.close()
    rds = boto3.client("rds", region_name="us-east-1")
    rds.create_db_instance(DBInstanceIdentifier="results", Engine="postgres", EngineVersion="18",
                           DBInstanceClass="db.t3.medium", MasterUsername="worker",
                           ManageMasterUserPassword=True, AllocatedStorage=20)
    secrets = boto3.client("secretsmanager", region_name="us-east-1")
    managed = handler_module.managed_secret_arn(rds, "results")
    secrets.put_secret_value(SecretId=managed, SecretString=json.dumps(
        {"username": "worker", "password": "first-Pw1"}))
    env = {"TILE_ENDPOINT": tiles.url + "/{z}/{x}/{y}.jpg", "PREDICTION_ENDPOINT": model.endpoint,
           "DATABASE_INSTANCE": "results", "DATABASE_HOST": "127.0.0.1",
           "DATABASE_PORT": str(scram_server.port), "DATABASE_NAME": "rotation",
           "DATABASE_SSLMODE": "disable", "RETRY_BACKOFF": "0.01"}
    app = handler_module.build(env)
    assert failures(app.run(sqs_event([body(1, 2, 3)]))) == set()

    # The rotation: a new password on the server and in the secret, and the worker's connection
    # dropped (a failover, an idle timeout, a restart).
    with admin.cursor() as cur:
        cur.execute("ALTER ROLE worker PASSWORD 'second-Pw2'")
        cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'worker'")
    secrets.put_secret_value(SecretId=managed, SecretString=json.dumps(
        {"username": "worker", "password": "second-Pw2"}))
    admin.close()

    assert failures(app.run(sqs_event([body(5, 6, 4)]))) == set()
    assert failures(app.run(sqs_event([body(0, 0, 0)]))) == set()
    written = f"postgresql://worker:second-Pw2@127.0.0.1:{scram_server.port}/rotation"
    assert rows(written) == expected((1, 2, 3), (5, 6, 4), (0, 0, 0))
    assert "second-Pw2" not in handler_module.mask(app.writer.url)


def test_a_wrong_password_without_a_secret_to_read_fails_the_batch(tiles, model, scram_server):
    """A DATABASE_URL is not re-read: a refused password fails the records (they come back),
    says why, and never prints the password."""
    url = f"postgresql://cnsq:not-the-Pw@127.0.0.1:{scram_server.port}/postgres"
    app = handler_module.build({"TILE_ENDPOINT": tiles.url + "/{z}/{x}/{y}.jpg",
                                "PREDICTION_ENDPOINT": model.endpoint, "DATABASE_URL": url,
                                "RETRY_BACKOFF": "0.01"})
    assert failures(app.run(sqs_event([body(1, 2, 3)]))) == {"m0"}


def test_the_stack_connects_with_tls_required():
    settings = Settings.from_env({"TILE_ENDPOINT": "http://x/{z}/{x}/{y}", "PREDICTION_ENDPOINT": "p",
                                  "DATABASE_INSTANCE": "db", "DATABASE_HOST": "h"})
    assert settings.database_sslmode == "require"
    assert handler_module.secret_to_url({"username": "u", "password": "p@ss", "host": "h"},
                                        "require") == "postgresql://u:p%40ss@h:5432/ResultsDB?sslmode=require"
    # With a CA bundle (RDS's, shipped in the zip) the server's name is verified too.
    bundle = Settings.from_env({"TILE_ENDPOINT": "http://x/{z}/{x}/{y}", "PREDICTION_ENDPOINT": "p",
                                "DATABASE_INSTANCE": "db", "DATABASE_SSLROOTCERT": "/var/task/rds.pem"})
    assert (bundle.database_sslmode, bundle.database_sslrootcert) == ("verify-full", "/var/task/rds.pem")


# -- HTTP: redirects, proxies and CA bundles, read from the environment the handler is built with


def test_a_redirected_tile_is_followed(make_app, db_url, tiles):
    moved = Redirector(tiles.url)
    try:
        app = make_app(TILE_ENDPOINT=moved.url + "/{z}/{x}/{y}.jpg")
        assert failures(app.run(sqs_event([body(*t) for t in GOOD]))) == set()
    finally:
        moved.close()
    assert rows(db_url) == expected(*GOOD)


def port_of(url: str) -> int:
    return urlparse(url).port


def test_a_proxy_in_the_environment_carries_tiles_and_predictions(make_app, db_url, tiles, model):
    # Names only the proxy can resolve: the handler reaches them through it or not at all.
    proxy = ForwardProxy(hosts={"tiles.test": "127.0.0.1", "model.test": "127.0.0.1"})
    tile_url = f"http://tiles.test:{port_of(tiles.url)}"
    predict_url = f"http://model.test:{port_of(model.url)}/v1/models/m:predict"
    try:
        app = make_app(HTTP_PROXY=proxy.url, TILE_ENDPOINT=tile_url + "/{z}/{x}/{y}.jpg",
                       PREDICTION_ENDPOINT=predict_url)
        assert failures(app.run(sqs_event([body(*t) for t in GOOD]))) == set()
    finally:
        proxy.close()
    assert rows(db_url) == expected(*GOOD)
    assert sorted(proxy.seen) == sorted([f"{tile_url}/{z}/{x}/{y}.jpg" for x, y, z in GOOD]
                                        + [predict_url])


def test_loopback_is_never_sent_to_a_proxy(make_app, db_url):
    # A proxy cannot reach this machine's 127.0.0.1 (cnsq run's model server, a local tile
    # server): loopback goes direct even with a proxy set and no NO_PROXY, here a dead one.
    app = make_app(HTTP_PROXY=f"http://127.0.0.1:{free_port()}", RETRIES=1)
    assert failures(app.run(sqs_event([body(*t) for t in GOOD]))) == set()
    assert rows(db_url) == expected(*GOOD)


def test_proxy_routing_follows_no_proxy_and_the_scheme():
    http = Http(4, proxies_from_env({"HTTP_PROXY": "proxy.test:3128",
                                     "no_proxy": "tiles.example.com,.internal,10.0.0.0/8"}))
    assert http.proxy_for("http://tiles.example.com/1/2/3.png") is None
    assert http.proxy_for("http://gpu.internal:8501/v1/models/m:predict") is None
    assert http.proxy_for("http://10.1.2.3:8501/v1/models/m:predict") is None  # CIDR, as requests
    for loopback in ("http://127.0.0.1:8501/x", "http://localhost:8000/x", "http://[::1]:8000/x"):
        assert http.proxy_for(loopback) is None
    assert http.proxy_for("http://imagery.example.com/1/2/3.png") == "http://proxy.test:3128"
    assert http.proxy_for("https://imagery.example.com/1/2/3.png") is None  # no HTTPS_PROXY


def test_proxies_from_env_lower_case_wins():
    assert proxies_from_env({"HTTPS_PROXY": "http://upper:1", "https_proxy": "http://lower:2",
                             "PATH": "/bin"}) == {"https": "http://lower:2"}


def test_a_proxy_that_is_down_fails_the_records_with_a_reason(make_app, db_url, tiles):
    app = make_app(HTTP_PROXY=f"http://127.0.0.1:{free_port()}", RETRIES=1,
                   TILE_ENDPOINT=f"http://tiles.test:{port_of(tiles.url)}/{{z}}/{{x}}/{{y}}.jpg")
    outcome = app.process(sqs_event([body(*t) for t in GOOD]))
    assert outcome.failed == {"m0": "tile_connection", "m1": "tile_connection",
                              "m2": "tile_connection"}
    assert rows(db_url) == {}


def test_a_tls_endpoint_is_trusted_through_the_ca_bundle_variable(make_app, db_url, tmp_path,
                                                                     caplog):
    context, cert = self_signed_tls(tmp_path)
    secure = TileServer(tls=context)
    try:
        endpoint = secure.url + "/{z}/{x}/{y}.jpg"
        app = make_app(TILE_ENDPOINT=endpoint, REQUESTS_CA_BUNDLE=str(cert))
        assert failures(app.run(sqs_event([body(*t) for t in GOOD]))) == set()
        # Without the bundle the certificate is refused: the tile fails, named, with the reason.
        untrusted = make_app(TILE_ENDPOINT=endpoint, RETRIES=1)
        outcome = untrusted.process(sqs_event([body(9, 9, 5)]))
    finally:
        secure.close()
    assert outcome.failed == {"m0": "tile_connection"}
    assert "certificate" in caplog.text.lower() and "9-9-5" in caplog.text
    assert rows(db_url) == expected(*GOOD)


def test_a_tile_endpoint_refusing_connections_fails_each_tile(make_app, db_url):
    app = make_app(TILE_ENDPOINT=f"http://127.0.0.1:{free_port()}/{{z}}/{{x}}/{{y}}.jpg", RETRIES=2)
    assert app.process(sqs_event([body(1, 2, 3), "bad"])).failed == {
        "m0": "tile_connection", "m1": "bad_record"}


def test_downloads_of_an_invocation_run_at_once(make_app, db_url):
    slow = TileServer(delay=0.3)  # a remote endpoint's latency
    try:
        app = make_app(TILE_ENDPOINT=slow.url + "/{z}/{x}/{y}.jpg", DOWNLOAD_WORKERS=8)
        tiles = [(x, 1, 4) for x in range(8)]
        assert failures(app.run(sqs_event([body(*t) for t in tiles]))) == set()
        # Not one after another: the server saw several at once (counted, not timed, so that a
        # busy machine cannot fail it; one after another would be 1).
        assert slow.most_in_flight >= 4
    finally:
        slow.close()
    assert rows(db_url) == expected(*tiles)


def test_malformed_download_workers_is_a_clear_error():
    with pytest.raises(ValueError, match="malformed numeric environment variable"):
        Settings.from_env({"TILE_ENDPOINT": "http://x/{z}/{x}/{y}", "PREDICTION_ENDPOINT": "http://m",
                           "DATABASE_URL": "sqlite:///r.db", "DOWNLOAD_WORKERS": "four"})


def test_imagery_url_forms():
    tile = Tile(1, 2, 3)
    assert imagery_url("https://t/{}/{}/{}.jpg?access_token={}", tile, "k") == "https://t/3/1/2.jpg?access_token=k"
    assert imagery_url("https://t/{z}/{x}/{y}.png?key={token}", tile, "k") == "https://t/3/1/2.png?key=k"
    assert imagery_url("https://t/{z}/{x}/{y}.png", tile, None) == "https://t/3/1/2.png"


def test_parse_tile_reads_by_name():
    assert parse_tile('{"y": 2, "z": 3, "x": 1, "extra": "ok"}') == Tile(1, 2, 3)
    with pytest.raises(BadRecord, match="'x' is not an integer"):
        parse_tile('{"x": null, "y": 2, "z": 3}')


def _load_example(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "lambda" / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_labelled_results(monkeypatch, tiles, model, db_url):
    example = _load_example("labelled_results")
    for key, value in {"TILE_ENDPOINT": tiles.url + "/{z}/{x}/{y}.jpg", "CLASS_NAMES": "bg,building",
                       "PREDICTION_ENDPOINT": model.endpoint, "DATABASE_URL": db_url}.items():
        monkeypatch.setenv(key, value)
    assert failures(example.handler(sqs_event([body(1, 2, 3)]))) == set()
    scores = score(tile_image(1, 2, 3))
    assert rows(db_url) == {"1-2-3": {"scores": scores, "label": ["bg", "building"][scores[1] > scores[0]]}}


def test_example_s3_images(aws, monkeypatch, model, db_url):
    import boto3

    s3 = boto3.client("s3", region_name="us-east-1")
    s3.create_bucket(Bucket="imagery")
    s3.put_object(Bucket="imagery", Key="tiles/3/1/2.jpg", Body=tile_image(1, 2, 3))
    example = _load_example("s3_images")
    for key, value in {"TILE_ENDPOINT": "s3://imagery/tiles/{z}/{x}/{y}.jpg",
                       "PREDICTION_ENDPOINT": model.endpoint, "DATABASE_URL": db_url,
                       "MISSING_TILES": "fail"}.items():
        monkeypatch.setenv(key, value)
    result = example.handler(sqs_event([body(1, 2, 3), body(5, 6, 4)]))
    assert failures(result) == {"m1"}  # no object for 5-6-4
    assert rows(db_url) == expected((1, 2, 3))


@pytest.mark.parametrize("template, message", [
    ("https://t/{z}/{x}/{y}/{q}.png", r"unknown placeholder \{q\}"),
    ("https://t/{}/{}/{}.png?access_token={token}", r"cannot be filled in"),
])
def test_a_tile_endpoint_that_cannot_be_filled_is_refused_at_cold_start(template, message):
    with pytest.raises(ValueError, match=message):
        Settings.from_env({"TILE_ENDPOINT": template, "PREDICTION_ENDPOINT": "http://m",
                           "DATABASE_URL": "sqlite:///x.db"})


def test_subdomains_spread_tiles_over_a_b_and_c():
    urls = {imagery_url("https://{s}.tiles/{z}/{x}/{y}.png", Tile(x, 0, 2), None) for x in range(3)}
    assert urls == {"https://a.tiles/2/0/0.png", "https://b.tiles/2/1/0.png", "https://c.tiles/2/2/0.png"}



# -- deadlines: nothing blocks the invocation past its time


class FakeContext:
    """What Lambda passes the handler: the time left in the invocation."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def get_remaining_time_in_millis(self) -> int:
        return int((self.end - time.monotonic()) * 1000)


@pytest.mark.alone
def test_a_tile_trickled_a_byte_at_a_time_fails_at_its_deadline(make_app, tiles, db_url):
    """Each read took 0.2 s, under TILE_TIMEOUT=2: the per-read timeout never fired."""
    tiles.trickle["1-2-3"] = 0.2
    app = make_app(TILE_TIMEOUT=2, TILE_DEADLINE=1.5, RETRIES=1)
    started = time.monotonic()
    outcome = app.process(sqs_event([body(*t) for t in GOOD]))
    assert time.monotonic() - started < 4
    assert outcome.failed == {"m0": "tile_deadline"}
    assert rows(db_url) == expected(*GOOD[1:])


@pytest.mark.alone
def test_records_left_when_the_lambda_runs_out_of_time_are_batch_item_failures(make_app, tiles):
    tiles.trickle["1-2-3"] = 0.2
    app = make_app(TILE_TIMEOUT=2, DEADLINE_RESERVE=1, RETRIES=1)
    started = time.monotonic()
    result = app.run(sqs_event([body(*t) for t in GOOD]), FakeContext(2.5))
    assert time.monotonic() - started < 2.5  # answered before Lambda would kill it
    assert failures(result) == {"m0"}


@pytest.mark.alone
@pytest.mark.parametrize("closing", [False, True], ids=["keep-alive", "connection-close"])
def test_slow_tiles_cost_their_own_records_and_nothing_after(make_app, tiles, db_url, closing):
    """A deadline ends the read itself: once more slow tiles than download workers have failed,
    the next invocation's healthy tiles are all written, at once. With `Connection: close` (an
    HTTP/1.0 server, Python's http.server) http.client gives the socket to the response and
    the connection forgets it: the deadline must end that read too."""
    tiles.close_connections = closing
    for x in range(4):
        tiles.trickle[f"{x}-9-5"] = 0.5  # a byte every half second: every read is quick
    app = make_app(TILE_TIMEOUT=2, TILE_DEADLINE=1, RETRIES=1, DOWNLOAD_WORKERS=2)
    for x in range(4):  # twice the workers, one invocation each
        outcome = app.process(sqs_event([body(x, 9, 5)]))
        assert outcome.failed == {"m0": "tile_deadline"}
    started = time.monotonic()
    outcome = app.process(sqs_event([body(*t) for t in GOOD]))
    assert outcome.failed == {}
    assert time.monotonic() - started < 1  # no download thread is still held by a slow tile
    assert rows(db_url) == expected(*GOOD)


@pytest.mark.alone
def test_slow_tile_headers_are_ended_by_the_deadline_too(make_app, tiles):
    tiles.trickle_headers["1-2-3"] = 0.3
    app = make_app(TILE_TIMEOUT=2, TILE_DEADLINE=1, RETRIES=1, DOWNLOAD_WORKERS=1)
    started = time.monotonic()
    assert app.process(sqs_event([body(1, 2, 3)])).failed == {"m0": "tile_deadline"}
    assert app.process(sqs_event([body(5, 6, 4)])).failed == {}
    assert time.monotonic() - started < 3


@pytest.mark.alone
def test_a_model_slower_than_the_time_left_fails_its_records_in_time(make_app, model):
    """The prediction request is bounded by the Lambda's remaining time: its records become
    batch item failures before Lambda would kill the invocation (and retry the whole batch)."""
    model.delay = 4
    app = make_app(PREDICT_TIMEOUT=30, DEADLINE_RESERVE=1, RETRIES=1)
    started = time.monotonic()
    result = app.run(sqs_event([body(*t) for t in GOOD]), FakeContext(2.5))
    assert time.monotonic() - started < 2.5
    assert failures(result) == {"m0", "m1", "m2"}


@pytest.mark.alone
def test_a_locked_results_table_fails_the_write_in_time(make_app, db_url):
    import psycopg2

    holder = psycopg2.connect(db_url)
    try:
        with holder.cursor() as cur:
            cur.execute("LOCK TABLE results IN ACCESS EXCLUSIVE MODE")
        app = make_app(DATABASE_TIMEOUT=1)
        started = time.monotonic()
        outcome = app.process(sqs_event([body(*t) for t in GOOD]))
        assert time.monotonic() - started < 5
        assert set(outcome.failed.values()) == {"database"} and len(outcome.failed) == 3
    finally:
        holder.rollback()
        holder.close()


def test_each_invocation_writes_its_record_counts_as_an_embedded_metric_line(make_app, capsys):
    """A record that fails is a batch item failure: the invocation succeeds and Lambda's Errors
    stays 0. With METRICS_NAMESPACE (the scaling stack sets it) the handler writes its counts
    in CloudWatch's embedded metric format on stdout, one line, for the controller."""
    app = make_app(METRICS_NAMESPACE="cnsq/cnsq-dev", AWS_LAMBDA_FUNCTION_NAME="cnsq-dev-worker")
    capsys.readouterr()
    app.run(sqs_event(["not a tile"] + [body(*t) for t in GOOD]))
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()
             if line.startswith("{")]
    [line] = [x for x in lines if "_aws" in x]
    directive = line["_aws"]["CloudWatchMetrics"][0]
    assert directive["Namespace"] == "cnsq/cnsq-dev"
    assert directive["Dimensions"] == [["FunctionName"]]
    assert {m["Name"] for m in directive["Metrics"]} == {"RecordsSucceeded", "RecordsFailed"}
    assert (line["FunctionName"], line["RecordsSucceeded"], line["RecordsFailed"]) == (
        "cnsq-dev-worker", 3, 1)
    assert isinstance(line["_aws"]["Timestamp"], int)
    # Without the namespace (one machine, a fixed stack), no such line.
    make_app().run(sqs_event([body(*GOOD[0])]))
    assert "_aws" not in capsys.readouterr().out


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_a_tile_over_its_size_fails_alone_and_is_never_held_whole(make_app, tiles, model, db_url,
                                                                   declared):
    """A 300 MB "tile" was read whole, base64-encoded and posted (1.8 GB resident; a 1 GB Lambda
    is killed and the whole batch fails on every retry). Each body is capped while it is read
    (MAX_TILE_BYTES); the tile fails alone, not retried."""
    big = b"\xff\xd8\xff" + b"x" * (2 * 2**20)
    tiles.content["1-2-3"] = big
    if not declared:
        tiles.chunked.add("1-2-3")
    app = make_app(MAX_TILE_BYTES=2**20)
    outcome = app.process(sqs_event([body(*t) for t in GOOD]))
    assert outcome.failed == {"m0": "tile_too_large"}
    assert tiles.requests["1-2-3"] == 1
    assert rows(db_url) == expected(*GOOD[1:])


def test_a_model_answer_over_its_size_fails_its_records(make_app, model, db_url):
    app = make_app(MAX_PREDICTION_BYTES=20)  # the answer for three tiles is ~90 bytes
    outcome = app.process(sqs_event([body(*t) for t in GOOD]))
    assert set(outcome.failed.values()) == {"model_too_large"} and len(outcome.failed) == 3
    assert model.batches == [3]  # asked once: the same answer would come again


@pytest.mark.parametrize("target", ["http://169.254.169.254", "http://169.254.170.2",
                                    "http://[fd00:ec2::254]", "http://[fe80::1]:8080"])
def test_a_redirect_to_the_metadata_service_is_refused(make_app, db_url, target):
    """An imagery server redirecting to a link-local or metadata address would have the Lambda
    read credentials. Refused before it is followed. (A proxy on a dead local port catches any
    request that would follow: nothing leaves this machine even if the refusal failed.)"""
    from support.servers import Redirector

    redirector = Redirector(target)
    try:
        app = make_app(TILE_ENDPOINT=redirector.url + "/{z}/{x}/{y}.jpg",
                       HTTP_PROXY=f"http://127.0.0.1:{free_port()}", RETRIES=1)
        outcome = app.process(sqs_event([body(1, 2, 3)]))
    finally:
        redirector.close()
    assert outcome.failed == {"m0": "tile_refused"}


def test_metadata_addresses_are_told_by_address_and_by_name():
    from download_and_predict.http import metadata_address

    assert metadata_address("169.254.169.254") == "169.254.169.254"
    assert metadata_address("[fd00:ec2::254]") == "fd00:ec2::254"
    assert metadata_address("127.0.0.1") is None and metadata_address("10.0.0.1") is None
    assert metadata_address("localhost") is None

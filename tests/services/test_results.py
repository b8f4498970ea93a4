"""The results store, `cnsq setup` and `cnsq download` against real PostgreSQL and SQLite."""

from __future__ import annotations

import csv
import io
import json
import uuid
from pathlib import Path

import boto3
import pytest
from click.testing import CliRunner

from cnsq.cli import main
from cnsq.results.store import DatabaseError, open_store
from support.servers import free_port, fresh_database


def cnsq(*args: str, env: dict | None = None):
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


@pytest.fixture
def pg_url(postgres_url):
    """A fresh, empty database."""
    return fresh_database(postgres_url, "r")


@pytest.fixture(params=["postgres", "sqlite"])
def any_url(request, pg_url, tmp_path):
    return pg_url if request.param == "postgres" else f"sqlite:///{tmp_path}/results.db"


def test_setup_twice_is_harmless(any_url):
    first = cnsq("setup", any_url)
    assert first.exit_code == 0, first.output
    assert "Applied migration(s) 1 (create results)" in first.stdout
    second = cnsq("setup", any_url)
    assert second.exit_code == 0
    assert "up to date; nothing to migrate" in second.stdout
    store = open_store(any_url)
    assert store.check_schema() == []
    assert store.count() == 0
    store.close()


def test_schema_check_names_what_is_missing(any_url):
    store = open_store(any_url)
    assert store.check_schema() == ["table 'results' does not exist (run `cnsq setup`)"]
    store.close()


def test_setup_with_a_string_that_is_not_a_url():
    result = cnsq("setup", "my-database-host")
    assert result.exit_code == 1
    assert "not a database URL: 'my-database-host'" in result.stderr


def test_setup_connection_failure_names_host_port_and_masks_the_password():
    port = free_port()
    result = cnsq("setup", f"postgresql://admin:pw-Zq81-never-print@127.0.0.1:{port}/ResultsDB")
    assert result.exit_code == 1
    assert f"cannot connect to PostgreSQL at 127.0.0.1:{port}" in result.stderr
    assert "pw-Zq81-never-print" not in result.output
    assert "Traceback" not in result.output


def test_setup_reads_the_deployed_stacks_database(project, pg_url):
    # moto shows outputs for stacks made by create_stack; the secret holds the real database.
    host_port, dbname = pg_url.split("@", 1)[1].split("/")
    host, port = host_port.split(":")
    secret = {"username": "cnsq", "password": "", "host": host, "port": int(port), "dbname": dbname}
    arn = boto3.client("secretsmanager", region_name="us-east-1").create_secret(
        Name="db", SecretString=json.dumps(secret))["ARN"]
    template = {"Resources": {"Q": {"Type": "AWS::SQS::Queue"}},
                "Outputs": {"databaseSecretArn": {"Value": arn}}}
    boto3.client("cloudformation", region_name="us-east-1").create_stack(
        StackName="cnsq-dev", TemplateBody=json.dumps(template))
    result = cnsq("setup", "--config", "config/config.yml")
    assert result.exit_code == 0, result.output
    assert "Applied migration(s) 1" in result.stdout
    assert open_store(pg_url).check_schema() == []


def test_download_reads_the_config_once(project, pg_url, tmp_path):
    """download climbed from the command to the results and back, loading the config (and
    printing its warnings) twice."""
    test_setup_reads_the_deployed_stacks_database(project, pg_url)  # a stack with a database
    path = Path("config/config.yml")
    path.write_text(path.read_text().replace("engineVersion: '18'", "engineVersion: '17.6'"))
    result = cnsq("download", str(tmp_path / "out.csv"), "--config", "config/config.yml")
    assert result.exit_code == 0, result.output
    assert result.stderr.count("warning: rds.engineVersion: 17.6 pins a minor version") == 1


def test_setup_without_database_or_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = cnsq("setup")
    assert result.exit_code == 1
    assert "no database given" in result.stderr


def _fill(url: str, n: int) -> dict[str, list[float]]:
    store = open_store(url)
    store.migrate()
    data = {f"{i}-{i % 7}-12": [i / n, 1 - i / n] for i in range(n)}
    store.upsert(list(data.items()))
    store.close()
    return data


def test_download_writes_tile_and_json_output(any_url, tmp_path):
    data = _fill(any_url, 250)
    out = tmp_path / "results.csv"
    result = cnsq("download", str(out), "--database-url", any_url)
    assert result.exit_code == 0, result.output
    assert "Wrote 250 rows" in result.stderr
    with out.open(newline="") as handle:
        reader = csv.reader(handle)
        assert next(reader) == ["tile", "output"]
        got = {tile: json.loads(output) for tile, output in reader}
    assert got == data
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_download_to_stdout_reads_database_url_from_the_environment(any_url):
    _fill(any_url, 3)
    result = cnsq("download", "-", env={"DATABASE_URL": any_url})
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "tile,output" and len(lines) == 4


def test_failed_download_leaves_no_file(any_url, tmp_path):
    out = tmp_path / "results.csv"  # no results table: the export fails
    result = CliRunner().invoke(main, ["download", str(out), "--database-url", any_url])
    assert result.exit_code != 0
    assert list(tmp_path.iterdir()) == [] or all(p.suffix == ".db" for p in tmp_path.iterdir())


def test_existing_file_is_only_replaced_by_a_complete_download(any_url, tmp_path):
    out = tmp_path / "results.csv"
    out.write_text("previous complete download\n")
    CliRunner().invoke(main, ["download", str(out), "--database-url", any_url])  # fails: no table
    assert out.read_text() == "previous complete download\n"


def test_sqlite_folder_must_exist(tmp_path):
    with pytest.raises(DatabaseError, match="does not exist"):
        open_store(f"sqlite:///{tmp_path}/missing/results.db")


def test_unsupported_scheme():
    with pytest.raises(DatabaseError, match="unsupported database scheme 'mysql'"):
        open_store("mysql://u:p@h/db")


def test_sqlite_and_postgres_exports_are_the_same(pg_url, tmp_path):
    lite = f"sqlite:///{tmp_path}/r.db"
    for url in (pg_url, lite):
        _fill(url, 40)
    outputs = []
    for url in (pg_url, lite):
        out = tmp_path / f"{uuid.uuid4().hex}.csv"
        assert cnsq("download", str(out), "--database-url", url).exit_code == 0
        with out.open(newline="") as handle:
            reader = csv.reader(handle)
            assert next(reader) == ["tile", "output"]
            outputs.append(sorted((t, json.loads(o)) for t, o in reader))
    assert outputs[0] == outputs[1]
    assert Path(tmp_path / "r.db").exists()


def test_download_checks_its_target_and_source_before_any_work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    missing_db = f"sqlite:///{tmp_path}/none.db"
    no_folder = cnsq("download", str(tmp_path / "nope" / "out.csv"), "--database-url", missing_db)
    assert no_folder.exit_code == 1 and "folder" in no_folder.stderr and "does not exist" in no_folder.stderr
    onto_folder = cnsq("download", str(tmp_path), "--database-url", missing_db)
    assert onto_folder.exit_code == 1 and "is a folder" in onto_folder.stderr
    no_db = cnsq("download", "out.csv", "--database-url", missing_db)
    assert no_db.exit_code == 1 and "no SQLite database at" in no_db.stderr
    assert not (tmp_path / "none.db").exists()  # no empty database left behind
    import sqlite3

    sqlite3.connect(tmp_path / "other.db").close()
    no_table = cnsq("download", "out.csv", "--database-url", f"sqlite:///{tmp_path}/other.db")
    assert no_table.exit_code == 1 and "table 'results' does not exist" in no_table.stderr
    assert not (tmp_path / "out.csv").exists()
    for result in (no_folder, onto_folder, no_db, no_table):
        assert "Traceback" not in result.output


def test_a_database_url_with_a_port_that_is_not_a_number():
    result = cnsq("setup", "postgresql://u:pw-Zq81-never-print@127.0.0.1:abc/db")
    assert result.exit_code == 1
    assert "is not a number: 'abc'" in result.stderr and "pw-Zq81" not in result.output


def _original_table(url: str, ddl: str, rows: list[tuple[str, str]]) -> None:
    import psycopg2

    with psycopg2.connect(url) as conn, conn.cursor() as cur:
        cur.execute(ddl)
        cur.executemany("INSERT INTO results (tile, output) VALUES (%s, %s)", rows)


@pytest.mark.parametrize("ddl", [
    "CREATE TABLE results (tile varchar(255) PRIMARY KEY, output jsonb)",     # the original's knex
    "CREATE TABLE results (id serial PRIMARY KEY, tile text, output jsonb)",  # a hand-made variant
])
def test_setup_adopts_a_table_the_original_created_keeping_every_row(pg_url, ddl):
    """The original Lambda stored pg8000's rendering of a mercantile Tile, {x,y,z}."""
    rows = [("{16047,12355,15}", "[0.1, 0.9]"), ("{1,2,3}", "[0.5, 0.5]"), ("1-2-3", "[0.2, 0.8]")]
    if "id serial" in ddl:
        rows.append(("1-2-3", "[0.3, 0.7]"))  # a duplicate: the newer row wins
    _original_table(pg_url, ddl, rows)
    store = open_store(pg_url)
    before = store.check_schema()
    store.close()
    if "id serial" in ddl:
        assert before == ["results.tile has no unique index: every write would fail (run `cnsq "
                          "setup`, which adds it and keeps every row)"]
    else:
        assert before == []  # varchar is as good as text
    result = cnsq("setup", pg_url)
    assert result.exit_code == 0, result.output
    store = open_store(pg_url)
    assert store.check_schema() == []
    store.upsert([("5-6-7", [1.0, 0.0])])  # the handler's ON CONFLICT (tile) works
    buffer = io.BytesIO()
    store.export_csv(buffer)
    store.close()
    exported = dict(list(csv.reader(io.StringIO(buffer.getvalue().decode())))[1:])
    assert exported == {"16047-12355-15": "[0.1, 0.9]",
                        "1-2-3": "[0.3, 0.7]" if "id serial" in ddl else "[0.2, 0.8]",
                        "5-6-7": "[1.0, 0.0]"}


@pytest.mark.parametrize("command", ["download", "export"])
def test_an_output_that_is_the_sqlite_database_read_is_refused(tmp_path, monkeypatch, command):
    """'cnsq download results.db --database-url sqlite:///results.db' replaced the database
    with its CSV: refused, the database unchanged (and so for export from the table)."""
    monkeypatch.chdir(tmp_path)
    url = "sqlite:///results.db"
    _fill(url, 5)
    before = (tmp_path / "results.db").read_bytes()
    extra = ["--format", "csv"] if command == "export" else []
    result = cnsq(command, "results.db", "--database-url", url, *extra)
    assert result.exit_code == 1, result.output
    assert "is the file being read" in result.stderr
    assert (tmp_path / "results.db").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.db"]

"""The Lambda zip: same sources → same bytes → same key; dependencies built for Lambda."""

from __future__ import annotations

import os
import shutil
import time
import zipfile
from pathlib import Path

import pytest

from cnsq.deploy.package import SubprocessPip, build
from cnsq.errors import PackageError

REPO = Path(__file__).resolve().parents[2]


class FolderPip:
    """A pip runner that 'installs' by writing a module, and counts its calls."""

    def __init__(self):
        self.calls = 0

    def install(self, requirements: Path, target: Path, runtime: str, architecture: str) -> None:
        self.calls += 1
        target.mkdir(parents=True)
        (target / "dep.py").write_text(f"# for {runtime} {architecture}\n")


def make_source(root: Path) -> Path:
    src = root / "lambda"
    (src / "pkg").mkdir(parents=True)
    (src / "pkg" / "__init__.py").write_text("")
    (src / "pkg" / "handler.py").write_text("def handler(event, context):\n    return 1\n")
    (src / "pkg" / "__pycache__").mkdir()
    (src / "pkg" / "__pycache__" / "handler.cpython-311.pyc").write_bytes(b"junk")
    (src / "requirements.txt").write_text("dep==1\n")
    return src


def test_same_sources_give_the_same_bytes(tmp_path):
    first = build("F", make_source(tmp_path / "a"), tmp_path / "build-a", "python3.12", "x86_64", FolderPip())
    time.sleep(1.1)  # a different mtime must not change the zip
    second_src = make_source(tmp_path / "b")
    os.chmod(second_src / "pkg" / "handler.py", 0o755)  # nor a different mode
    second = build("F", second_src, tmp_path / "build-b", "python3.12", "x86_64", FolderPip())
    assert first.path.read_bytes() == second.path.read_bytes()
    assert first.sha256 == second.sha256
    assert first.key("stack") == f"stack/lambdas/{first.sha256}.zip"


def test_one_changed_byte_gives_a_new_key(tmp_path):
    src = make_source(tmp_path)
    pip = FolderPip()
    before = build("F", src, tmp_path / "build", "python3.12", "x86_64", pip)
    handler = src / "pkg" / "handler.py"
    handler.write_text(handler.read_text().replace("1", "2"))
    after = build("F", src, tmp_path / "build", "python3.12", "x86_64", pip)
    assert before.sha256 != after.sha256
    assert pip.calls == 1  # dependencies are cached per requirements/runtime/architecture


def test_zip_holds_code_and_dependencies_but_no_bytecode(tmp_path):
    built = build("F", make_source(tmp_path), tmp_path / "build", "python3.12", "arm64", FolderPip())
    with zipfile.ZipFile(built.path) as archive:
        names = archive.namelist()
        assert names == sorted(names)
        assert {"pkg/handler.py", "pkg/__init__.py", "dep.py", "requirements.txt"} <= set(names)
        assert not any(n.endswith(".pyc") or "__pycache__" in n for n in names)
        assert archive.read("dep.py") == b"# for python3.12 arm64\n"
        assert all(i.date_time == (1980, 1, 1, 0, 0, 0) for i in archive.infolist())


def test_new_requirements_reinstall_dependencies(tmp_path):
    src = make_source(tmp_path)
    pip = FolderPip()
    build("F", src, tmp_path / "build", "python3.12", "x86_64", pip)
    (src / "requirements.txt").write_text("dep==2\n")
    build("F", src, tmp_path / "build", "python3.12", "x86_64", pip)
    build("F", src, tmp_path / "build", "python3.13", "x86_64", pip)
    assert pip.calls == 3


def test_an_existing_zip_is_used_as_is(tmp_path):
    archive = tmp_path / "prebuilt.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("x.py", "x = 1\n")
    built = build("F", archive, tmp_path / "build", "python3.12", "x86_64", FolderPip())
    assert built.path == archive


@pytest.mark.parametrize("name", ["missing.zip", "missing-folder"])
def test_missing_source_is_a_clear_error(tmp_path, name):
    with pytest.raises(PackageError, match=rf"lambdas.F.source: .*{name}"):
        build("F", tmp_path / name, tmp_path / "build", "python3.12", "x86_64", FolderPip())


def test_real_pip_installs_manylinux_wheels_for_the_lambda_runtime(tmp_path):
    src = tmp_path / "lambda"
    src.mkdir()
    (src / "requirements.txt").write_text("six==1.16.0\n")
    (src / "app.py").write_text("import six\n")
    built = build("F", src, tmp_path / "build", "python3.12", "x86_64", SubprocessPip())
    with zipfile.ZipFile(built.path) as archive:
        assert "six.py" in archive.namelist()


def test_real_pip_failure_is_reported(tmp_path):
    src = tmp_path / "lambda"
    src.mkdir()
    (src / "requirements.txt").write_text("this-package-does-not-exist-cnsq==0.0.1\n")
    with pytest.raises(PackageError, match="pip could not install"):
        build("F", src, tmp_path / "build", "python3.12", "x86_64", SubprocessPip())


def test_repository_lambda_packages(tmp_path):
    src = tmp_path / "lambda"
    shutil.copytree(REPO / "lambda", src, ignore=shutil.ignore_patterns("requirements.txt"))
    built = build("DownloadAndPredict", src, tmp_path / "build", "python3.12", "x86_64", FolderPip())
    with zipfile.ZipFile(built.path) as archive:
        assert "download_and_predict/__init__.py" in archive.namelist()


class _Pip:
    """pip as two builders run it: the same package, console scripts that name each builder's
    own interpreter, and a RECORD that lists them."""

    def __init__(self, interpreter: str):
        self.interpreter = interpreter

    def install(self, requirements, target, runtime, architecture) -> None:
        (target / "tool").mkdir(parents=True)
        (target / "tool" / "__init__.py").write_text("VERSION = 1\n")
        (target / "bin").mkdir()
        (target / "bin" / "tool").write_text(f"#!{self.interpreter}\nfrom tool import main\n")
        info = target / "tool-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text("Name: tool\nVersion: 1.0\n")
        (info / "RECORD").write_text(f"bin/tool,sha256={hash(self.interpreter)},40\n")
        (info / "INSTALLER").write_text("pip\n")


def test_the_same_code_gives_the_same_zip_from_any_environment(tmp_path):
    """Two virtual environments hashed the same code differently: bin/ scripts carry the
    builder's interpreter path."""
    from cnsq.deploy.package import build

    source = tmp_path / "src"
    (source / "handler").mkdir(parents=True)
    (source / "handler" / "__init__.py").write_text("def handler(event, context): pass\n")
    (source / "requirements.txt").write_text("tool==1.0\n")
    first = build("W", source, tmp_path / "one", "python3.12", "x86_64", _Pip("/home/a/venv/bin/python"))
    second = build("W", source, tmp_path / "two", "python3.12", "x86_64", _Pip("/opt/b/.venv/bin/python3"))
    assert first.sha256 == second.sha256
    names = zipfile.ZipFile(first.path).namelist()
    assert "tool/__init__.py" in names and "tool-1.0.dist-info/METADATA" in names
    assert not [n for n in names if n.startswith("bin/") or n.endswith(("/RECORD", "/INSTALLER"))]

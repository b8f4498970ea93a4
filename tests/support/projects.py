"""A project folder as a user has one, and the secrets no output may hold."""

from __future__ import annotations

import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Values that must never reach a file, S3, an output or the terminal. (RDS_PASSWORD is what an old
# config still names: it is dropped unread.) The username is not a secret.
SECRETS = {"RDS_PASSWORD": "pw-Zq81-never-print", "TILE_ACCESS_TOKEN": "tok-8JmX-never-print"}
ENV = {"RDS_USERNAME": "resultsadmin", **SECRETS}


def make_project(root: Path, bucket: str = "cnsq-artifacts", vpc: str | None = "vpc-0123456789abcdef0",
                 subnets: tuple[str, str] = ("subnet-0123456789abcdef0", "subnet-0fedcba9876543210"),
                 ) -> Path:
    """A project folder: config/config.yml (from the example), config/.env, a small lambda/."""
    (root / "config").mkdir(parents=True)
    # The example's placeholders filled in, as a user does before validate and deploy.
    text = (REPO / "config" / "config.example.yml").read_text().replace("your-bucket", bucket)
    text = text.replace("    # keyPairName: your-key-pair", "    keyPairName: cnsq-key")
    text = text.replace("/v1/models/your_model", "/v1/models/water")
    text = text.replace("https://example.com/{}", "https://tiles.test/{}")
    if vpc:  # an existing network, as the example's commented-out lines describe it
        text = text.replace("  # vpc: vpc-0123456789abcdef0", f"  vpc: {vpc}")
        text = text.replace("  # subnets:\n  #   - subnet-0123456789abcdef0\n  #   - subnet-0fedcba9876543210",
                            f"  subnets:\n    - {subnets[0]}\n    - {subnets[1]}")
    (root / "config" / "config.yml").write_text(text)
    (root / "config" / ".env").write_text("".join(f"{k}='{v}'\n" for k, v in ENV.items()))
    # The real lambda/ code, without dependencies: pip is exercised in test_package.
    shutil.copytree(REPO / "lambda", root / "lambda",
                    ignore=shutil.ignore_patterns("__pycache__", "requirements.txt"))
    return root / "config" / "config.yml"


def example_config(tmp_path, imagery: str):
    """The example config with ``imagery`` (YAML lines) before its ecs section, loaded."""
    from pathlib import Path

    from cnsq.config import load_config

    repo = Path(__file__).resolve().parents[2]
    text = (repo / "config" / "config.example.yml").read_text().replace(
        "  ecs:\n", imagery + "\n  ecs:\n", 1)
    (tmp_path / "config").mkdir(parents=True, exist_ok=True)
    (tmp_path / "config" / "config.yml").write_text(text)
    (tmp_path / "config" / ".env").write_text("RDS_USERNAME=admin\nTILE_ACCESS_TOKEN=t\n")
    return load_config(tmp_path / "config" / "config.yml", environ={}), repo

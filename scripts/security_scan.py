"""Scan the compiled example stack with checkov; fail on any finding not in the allowlist.

Compiles ``config/config.example.yml`` three ways — as shipped (the stack creates its network),
with an existing VPC, and the ``prod`` deployment — and runs checkov on each. Every failed check
must match a line of ``.ci/checkov-allowlist.txt`` (check id, resource pattern, reason). Some
checks may never be allowlisted: a public database, ingress from the internet, a Lambda outside
the VPC, an unencrypted database; those must also have run and passed.

Usage: python scripts/security_scan.py [--allowlist PATH]
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NEVER = {
    "CKV_AWS_17": "RDS instance publicly accessible",
    "CKV_AWS_16": "RDS storage not encrypted",
    "CKV_AWS_117": "Lambda outside a VPC",
    "CKV_AWS_260": "ingress from 0.0.0.0/0 to port 80",
    "CKV_AWS_24": "ingress from 0.0.0.0/0 to port 22",
    "CKV_AWS_25": "ingress from 0.0.0.0/0 to port 3389",
    "CKV_AWS_277": "ingress from 0.0.0.0/0 to all ports",
}
MUST_PASS = ("CKV_AWS_17", "CKV_AWS_16", "CKV_AWS_117")
GIVEN_VPC = ("  vpc: vpc-0123456789abcdef0\n  subnets:\n    - subnet-0123456789abcdef0\n"
             "    - subnet-0fedcba9876543210\n")


def read_allowlist(path: Path) -> list[tuple[str, str, str]]:
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split(None, 2)
        if len(parts) < 3:
            sys.exit(f"{path}:{number}: expected CHECK_ID RESOURCE-PATTERN reason")
        if parts[0] in NEVER:
            sys.exit(f"{path}:{number}: {parts[0]} ({NEVER[parts[0]]}) may never be allowlisted")
        entries.append((parts[0], parts[1], parts[2]))
    return entries


def compile_variants(out: Path) -> list[Path]:
    sys.path.insert(0, str(ROOT))
    from cnsq.config import load_config
    from cnsq.deploy.template import CodeLocation, compile_template

    example = (ROOT / "config" / "config.example.yml").read_text()
    commented = "".join("  # " + line[2:] if line.strip() else line
                        for line in GIVEN_VPC.splitlines(keepends=True))
    variants = {"default": (example, None), "prod": (example, "prod"),
                "existing-vpc": (example.replace(commented, GIVEN_VPC), None)}
    paths = []
    for name, (text, deployment) in variants.items():
        folder = out / name / "config"
        folder.mkdir(parents=True)
        (folder / "config.yml").write_text(text)
        (folder / ".env").write_text("RDS_USERNAME=postgres\nTILE_ACCESS_TOKEN=scan-token\n")
        config = load_config(folder / "config.yml", deployment, environ={})
        code = {n: CodeLocation(config.bucket, "scan.zip") for n in config.values["lambdas"]}
        path, _ = compile_template(config, ROOT / "templates", out / name / "build", code)
        paths.append(path)
    return paths


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--allowlist", type=Path, default=ROOT / ".ci" / "checkov-allowlist.txt")
    parser.add_argument("--checkov", default=None,
                        help="the checkov program (CI installs it in an environment of its own: "
                             "its pins would downgrade the libraries cnsq runs with); default: "
                             "this Python's checkov module")
    args = parser.parse_args()
    checkov = [args.checkov] if args.checkov else [sys.executable, "-m", "checkov.main"]
    allow = read_allowlist(args.allowlist)
    problems: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for template in compile_variants(Path(tmp)):
            variant = template.parent.parent.parent.name
            done = subprocess.run(
                [*checkov, "--file", str(template),
                 "--framework", "cloudformation", "--output", "json", "--compact"],
                capture_output=True, text=True)
            try:
                report = json.loads(done.stdout)
            except ValueError:
                print(done.stdout[-2000:], done.stderr[-2000:], file=sys.stderr)
                return 2
            results = (report[0] if isinstance(report, list) else report)["results"]
            passed = {c["check_id"] for c in results["passed_checks"]}
            missing = [c for c in MUST_PASS if c not in passed]
            if missing:
                problems.append(f"{variant}: checks {', '.join(missing)} did not run and pass")
            accepted = 0
            for failed in results["failed_checks"]:
                resource = failed["resource"].split(".", 1)[-1]
                if any(failed["check_id"] == check and fnmatch.fnmatch(resource, pattern)
                       for check, pattern, _ in allow):
                    accepted += 1
                    continue
                problems.append(f"{variant}: {failed['check_id']} {resource}: {failed['check_name']}")
            print(f"security scan {variant}: {len(passed)} checks passed, {accepted} findings "
                  f"allowlisted, {len(results['failed_checks']) - accepted} not allowed")
    for problem in problems:
        print(f"  {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

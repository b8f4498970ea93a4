"""cnsq gpu-util: instance discovery against moto, nvidia-smi through a local runner."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from cnsq.aws import Aws
from cnsq.cli import main
from cnsq.config import load_config
from cnsq.deploy.cloudformation import Stacks
from cnsq.ops.gpu import GpuError, Instance, discover, gpu_rows, parse_nvidia_smi
from cnsq.stack.deployed import Deployed
from support.accounts import client


class LocalRunner:
    """Runs the command here, with a fake nvidia-smi first on PATH; some instances are 'down'."""

    def __init__(self, bin_dir: Path, down: set[str]):
        self.bin_dir, self.down = bin_dir, down

    def run(self, instance: Instance, command: str) -> str:
        if instance.id in self.down:
            raise RuntimeError(f"ssh: connect to host {instance.ip} port 22: Connection timed out")
        env = {**os.environ, "PATH": f"{self.bin_dir}:{os.environ['PATH']}",
               "FAKE_INSTANCE": instance.id}
        return subprocess.run(command, shell=True, env=env, capture_output=True, text=True,
                              check=True).stdout


@pytest.fixture
def fake_nvidia_smi(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "nvidia-smi"
    script.write_text('#!/bin/sh\n'
                      'case "$*" in *--query-gpu=index,utilization.gpu,memory.used,memory.total*) ;;'
                      ' *) echo "bad query" >&2; exit 2;; esac\n'
                      'echo "0, 87, 10240, 16384"\necho "1, 5, 512, 16384"\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return bin_dir


def register(cluster: str, count: int) -> list[str]:
    ec2, ecs = client("ec2"), client("ecs")
    image = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    ids = [i["InstanceId"] for i in ec2.run_instances(ImageId=image, MinCount=count, MaxCount=count,
                                                      InstanceType="p3.2xlarge")["Instances"]]
    for instance_id in ids:
        ecs.register_container_instance(cluster=cluster, instanceIdentityDocument=json.dumps(
            {"instanceId": instance_id, "instanceType": "p3.2xlarge", "region": "us-east-1"}))
    return ids


def test_discovery_through_the_stack_and_a_row_per_gpu(project, fake_nvidia_smi):
    assert CliRunner().invoke(main, ["deploy"]).exit_code == 0
    stacks = Stacks(client("cloudformation"), client("s3"))
    deployed = Deployed(load_config(Path("config/config.yml")), Aws(), stacks)
    cluster = deployed.cluster
    ids = register(cluster, 3)
    instances = discover(client("ecs"), client("ec2"), cluster)
    assert sorted(i.id for i in instances) == sorted(ids)
    assert all(i.instance_type == "p3.2xlarge" and i.ip for i in instances)

    rows = gpu_rows(instances, LocalRunner(fake_nvidia_smi, down={ids[1]}))
    by_ip = {}
    for row in rows:
        by_ip.setdefault(row.ip, []).append(row)
    down_ip = next(i.ip for i in instances if i.id == ids[1])
    assert [r.error for r in by_ip[down_ip]] == [
        f"ssh: connect to host {down_ip} port 22: Connection timed out"]
    for ip, found in by_ip.items():
        if ip != down_ip:
            assert [(r.gpu, r.utilization, r.memory) for r in found] == [
                ("0", "87 %", "10240 / 16384 MiB"), ("1", "5 %", "512 / 16384 MiB")]


def test_empty_cluster_has_no_instances(aws):
    client("ecs").create_cluster(clusterName="empty")
    assert discover(client("ecs"), client("ec2"), "empty") == []


def test_parse_rejects_unexpected_output():
    with pytest.raises(GpuError, match="unexpected nvidia-smi output"):
        parse_nvidia_smi("NVIDIA-SMI has failed because it couldn't communicate with the driver")


def test_cli_needs_a_key_or_ssm(project):
    result = CliRunner().invoke(main, ["gpu-util"])
    assert result.exit_code == 1 and "pass SSH_KEY" in result.stderr

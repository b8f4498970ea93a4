"""The compiled stack is private by default, in both network modes, and current on AWS.

A test fails if any security group admits 0.0.0.0/0 or ::/0, if the database or the load balancer
is public, or if a Lambda runs outside the VPC — for the example config as shipped (the stack
creates the network) and with an existing VPC.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cnsq.config import load_config
from cnsq.deploy.template import CodeLocation, compile_template, lint

REPO = Path(__file__).resolve().parents[2]
TEMPLATES = REPO / "templates"
ENV = "RDS_USERNAME=resultsadmin\nTILE_ACCESS_TOKEN=tok-8JmX-never-print\n"
CODE = {"DownloadAndPredict": CodeLocation("your-bucket", "cnsq-dev/lambdas/abc.zip")}
GIVEN_NETWORK = ("  vpc: vpc-0123456789abcdef0\n  subnets:\n    - subnet-0123456789abcdef0\n"
                 "    - subnet-0fedcba9876543210\n")


def compile_example(tmp_path: Path, edit=lambda text: text, deployment: str | None = None):
    text = edit((REPO / "config" / "config.example.yml").read_text())
    (tmp_path / "config").mkdir(exist_ok=True)
    (tmp_path / "config" / "config.yml").write_text(text)
    (tmp_path / "config" / ".env").write_text(ENV)
    config = load_config(tmp_path / "config" / "config.yml", deployment, environ={})
    path, data = compile_template(config, TEMPLATES, tmp_path / "out", CODE)
    return config, path, data


def given_vpc(text: str) -> str:
    return text.replace("  # vpc: vpc-0123456789abcdef0\n  # subnets:\n  #   - subnet-0123456789abcdef0\n"
                        "  #   - subnet-0fedcba9876543210\n", GIVEN_NETWORK)


def of_type(data: dict, kind: str) -> dict:
    return {k: r for k, r in data["Resources"].items() if r["Type"] == kind}


def open_to_the_internet(data: dict) -> list[str]:
    found = []
    for name, group in of_type(data, "AWS::EC2::SecurityGroup").items():
        for rule in group["Properties"].get("SecurityGroupIngress", []):
            if rule.get("CidrIp") == "0.0.0.0/0" or rule.get("CidrIpv6") == "::/0":
                found.append(name)
    for name, rule in of_type(data, "AWS::EC2::SecurityGroupIngress").items():
        if rule["Properties"].get("CidrIp") == "0.0.0.0/0" or rule["Properties"].get("CidrIpv6") == "::/0":
            found.append(name)
    return found


@pytest.fixture(params=["created network", "given vpc"])
def private(request, tmp_path):
    edit = (lambda text: text) if request.param == "created network" else given_vpc
    return compile_example(tmp_path, edit)


def test_nothing_is_reachable_from_the_internet(private):
    _, path, data = private
    assert open_to_the_internet(data) == []
    db = data["Resources"]["cnsqdevResultsDB"]["Properties"]
    assert db["PubliclyAccessible"] is False
    assert data["Resources"]["cnsqdevLoadBalancer"]["Properties"]["Scheme"] == "internal"
    functions = of_type(data, "AWS::Lambda::Function")
    assert set(functions) == {"DownloadAndPredictLambdaFunction", "AdminLambdaFunction",
                              "cnsqdevControllerFunction"}
    for function in functions.values():
        vpc = function["Properties"]["VpcConfig"]
        assert vpc["SecurityGroupIds"] == [{"Fn::GetAtt": ["LambdaSecurityGroup", "GroupId"]}]
        assert len(vpc["SubnetIds"]) == 2
    assert lint(path) == []


def test_the_database_and_the_model_admit_the_lambdas_only(private):
    _, _, data = private
    lambdas = {"Fn::GetAtt": ["LambdaSecurityGroup", "GroupId"]}
    for name, port in (("DatabaseSecurityGroup", 5432), ("cnsqdevLoadBalancerSecurityGroup", 80)):
        rules = data["Resources"][name]["Properties"]["SecurityGroupIngress"]
        assert [(r["SourceSecurityGroupId"], r["FromPort"], r["ToPort"]) for r in rules] == [
            (lambdas, port, port)], name
    assert "SecurityGroupIngress" not in data["Resources"]["LambdaSecurityGroup"]["Properties"]


def test_the_stack_creates_a_private_network_when_the_config_names_none(tmp_path):
    _, _, data = compile_example(tmp_path)
    resources = data["Resources"]
    vpc = resources["VPC"]["Properties"]
    assert vpc["EnableDnsSupport"] is True and vpc["EnableDnsHostnames"] is True
    zones = [resources[f"PrivateSubnet{i}"]["Properties"]["AvailabilityZone"] for i in (1, 2)]
    assert zones == [{"Fn::Select": [0, {"Fn::GetAZs": ""}]}, {"Fn::Select": [1, {"Fn::GetAZs": ""}]}]
    assert resources["PrivateDefaultRoute"]["Properties"]["NatGatewayId"] == {"Ref": "NatGateway"}
    assert resources["NatGateway"]["Properties"]["SubnetId"] == {"Ref": "PublicSubnet1"}
    assert resources["S3Endpoint"]["Properties"]["VpcEndpointType"] == "Gateway"
    for i in (1, 2):
        assert resources[f"PublicSubnet{i}"]["Properties"]["MapPublicIpOnLaunch"] is False
    private = [{"Ref": "PrivateSubnet1"}, {"Ref": "PrivateSubnet2"}]
    assert resources["DatabaseSubnetGroup"]["Properties"]["SubnetIds"] == private
    assert resources["cnsqdevLoadBalancer"]["Properties"]["Subnets"] == private
    assert resources["cnsqdevECSAutoScalingGroup"]["Properties"]["VPCZoneIdentifier"] == private


def test_an_existing_vpc_is_used_as_given(tmp_path):
    _, _, data = compile_example(tmp_path, given_vpc)
    assert "VPC" not in data["Resources"] and "NatGateway" not in data["Resources"]
    assert data["Resources"]["DatabaseSubnetGroup"]["Properties"]["SubnetIds"] == [
        "subnet-0123456789abcdef0", "subnet-0fedcba9876543210"]


def dual_stack(data: dict) -> dict:
    """What makes imagery over IPv6 skip the NAT: per Lambda, its flag; the IPv6 egress rule."""
    lambdas = of_type(data, "AWS::Lambda::Function")
    egress = data["Resources"]["LambdaSecurityGroup"]["Properties"]["SecurityGroupEgress"]
    return {"flags": {name: fn["Properties"]["VpcConfig"].get("Ipv6AllowedForDualStack", False)
                      for name, fn in lambdas.items()},
            "ipv6 egress": any(rule.get("CidrIpv6") == "::/0" for rule in egress),
            "network": sorted(k for k in ("VPCIpv6Block", "EgressOnlyInternetGateway",
                                          "PrivateIpv6Route") if k in data["Resources"])}


def test_the_created_network_is_dual_stack_so_imagery_over_ipv6_skips_the_nat(tmp_path):
    _, _, data = compile_example(tmp_path)
    found = dual_stack(data)
    assert all(found["flags"].values()) and found["ipv6 egress"]
    assert found["network"] == ["EgressOnlyInternetGateway", "PrivateIpv6Route", "VPCIpv6Block"]
    resources = data["Resources"]
    route = resources["PrivateIpv6Route"]["Properties"]
    assert route == {"RouteTableId": {"Ref": "PrivateRouteTable"}, "DestinationIpv6CidrBlock": "::/0",
                     "EgressOnlyInternetGatewayId": {"Ref": "EgressOnlyInternetGateway"}}
    for i in (1, 2):
        subnet = resources[f"PrivateSubnet{i}"]
        # A /64 each of the VPC's block, which exists only once the association is made.
        assert subnet["DependsOn"] == "VPCIpv6Block"
        assert subnet["Properties"]["Ipv6CidrBlock"] == {"Fn::Select": [i, {"Fn::Cidr": [
            {"Fn::Select": [0, {"Fn::GetAtt": ["VPC", "Ipv6CidrBlocks"]}]}, 4, 64]}]}
    # Nothing comes in over IPv6: an egress-only gateway, and no public subnet gets a block.
    assert "Ipv6CidrBlock" not in resources["PublicSubnet1"]["Properties"]


@pytest.mark.parametrize("ipv6, network, expected", [
    (None, "given vpc", False), ("true", "given vpc", True), ("false", "created network", False)])
def test_dual_stack_for_a_given_network_is_the_users_choice(tmp_path, ipv6, network, expected):
    def edit(text: str) -> str:
        text = given_vpc(text) if network == "given vpc" else text
        return text if ipv6 is None else text.replace("  ecs:\n", f"  ipv6: {ipv6}\n\n  ecs:\n", 1)
    _, _, data = compile_example(tmp_path, edit)
    found = dual_stack(data)
    assert set(found["flags"].values()) == {expected} and found["ipv6 egress"] is expected
    # A given network's gateways and routes are its owner's: the stack adds none.
    assert found["network"] == []


def test_opening_the_database_and_the_model_is_an_opt_in(tmp_path):
    config, _, data = compile_example(tmp_path, lambda text: text.replace(
        "    # publiclyAccessible: true", "    publiclyAccessible: true").replace(
        "    # allowedCidr: 203.0.113.0/24 # operators' network, admitted to port 5432 (empty: nobody)",
        "    allowedCidr: 203.0.113.0/24").replace(
        "    # allowedCidr: 203.0.113.0/24 # operators' network, admitted to the internal",
        "    allowedCidr: 198.51.100.0/24 #"))
    assert data["Resources"]["cnsqdevResultsDB"]["Properties"]["PubliclyAccessible"] is True
    # A public database needs public subnets to have an address in.
    assert data["Resources"]["DatabaseSubnetGroup"]["Properties"]["SubnetIds"] == [
        {"Ref": "PublicSubnet1"}, {"Ref": "PublicSubnet2"}]
    db_rules = data["Resources"]["DatabaseSecurityGroup"]["Properties"]["SecurityGroupIngress"]
    assert [r.get("CidrIp") for r in db_rules] == [None, "203.0.113.0/24"]
    lb_rules = data["Resources"]["cnsqdevLoadBalancerSecurityGroup"]["Properties"]["SecurityGroupIngress"]
    assert [r.get("CidrIp") for r in lb_rules] == [None, "198.51.100.0/24"]
    assert any(w.startswith("rds.publiclyAccessible: true") for w in config.warnings)


def test_current_aws_values_that_do_not_rot(tmp_path):
    _, _, data = compile_example(tmp_path)
    resources = data["Resources"]
    assert data["Parameters"]["AmiId"]["Type"] == "AWS::EC2::Image::Id"  # pinned by deploy
    assert data["Parameters"]["AmiId"]["Description"].endswith(
        "/aws/service/ecs/optimized-ami/amazon-linux-2023/gpu/recommended/image_id")
    user_data = resources["cnsqdevLaunchTemplate"]["Properties"]["LaunchTemplateData"]["UserData"][
        "Fn::Base64"]["Fn::Sub"]
    assert "dnf install -y amazon-cloudwatch-agent" in user_data and "yum" not in user_data
    assert "ECS_ENABLE_GPU_SUPPORT=true" in user_data
    assert resources["cnsqdevResultsDB"]["Properties"]["EngineVersion"] == "18"
    service = resources["cnsqdevECSService"]["Properties"]
    assert service["DeploymentConfiguration"]["DeploymentCircuitBreaker"] == {
        "Enable": True, "Rollback": True}
    for queue in ("cnsqdevTileQueue", "cnsqdevDeadLetterQueue"):
        assert resources[queue]["Properties"]["SqsManagedSseEnabled"] is True


def test_a_multi_gpu_instance_gets_one_task_per_gpu(tmp_path):
    _, _, data = compile_example(tmp_path, lambda text: text.replace(
        "instanceType: g4dn.xlarge", "instanceType: g5.12xlarge"), deployment="prod")
    controller = data["Resources"]["cnsqprodControllerFunction"]["Properties"]["Environment"]
    assert controller["Variables"]["MAX_TASKS"] == "16"  # 4 x 4 GPUs
    (tmp_path / "fixed").mkdir()
    _, _, data = compile_example(tmp_path / "fixed", lambda text: text.replace(
        "instanceType: g4dn.xlarge", "instanceType: g5.12xlarge").replace(
        "    minInstances: 0\n", ""), deployment="prod")
    assert data["Resources"]["cnsqprodECSService"]["Properties"]["DesiredCount"] == 16


def test_a_cpu_model_server_asks_for_no_gpu(tmp_path):
    _, _, data = compile_example(tmp_path, lambda text: text.replace(
        "instanceType: g4dn.xlarge", "instanceType: c6i.xlarge").replace("gpus: 1", "gpus: 0"))
    task = data["Resources"]["cnsqdevTaskDefinition"]["Properties"]["ContainerDefinitions"][0]
    assert "ResourceRequirements" not in task
    assert data["Parameters"]["AmiId"]["Description"].endswith(
        "/aws/service/ecs/optimized-ami/amazon-linux-2023/recommended/image_id")


def test_batching_deployment_sets_the_window_lambda_requires(tmp_path):
    _, path, data = compile_example(tmp_path, deployment="prod")
    mapping = data["Resources"]["cnsqprodDownloadAndPredictLambdaEventSourceMapping"]["Properties"]
    assert (mapping["BatchSize"], mapping["MaximumBatchingWindowInSeconds"]) == (50, 2)
    assert data["Resources"]["cnsqprodResultsDB"]["Properties"]["DeletionProtection"] is True
    assert open_to_the_internet(data) == [] and lint(path) == []


def test_the_original_logical_ids_are_kept(tmp_path):
    """Every resource of the original template that still exists keeps its logical id, so a
    kes-deployed stack updates in place (tests/services/test_upgrade.py deploys over one)."""
    _, _, data = compile_example(tmp_path)
    kept = {"cnsqdevTileQueue", "cnsqdevDeadLetterQueue", "DownloadAndPredictLambdaFunction",
            "DownloadAndPredictLambdaFunctionLogGroup", "cnsqdevDownloadAndPredictLambdaEventSourceMapping",
            "cnsqdevInstanceProfile", "cnsqdevTaskDefinition", "cnsqdevDockerLogs", "cnsqdevECSService",
            "cnsqdevECSCluster", "cnsqdevECSAutoScalingGroup", "cnsqdevECSHostSecurityGroup",
            "cnsqdevResultsDB", "cnsqdevLoadBalancer", "cnsqdevTargetGroup",
            "cnsqdevLoadBalancerListener", "cnsqdevLoadBalancerSecurityGroup",
            "LambdaProcessingRole", "ECSRole"}
    assert kept <= set(data["Resources"])
    assert json.dumps(data).count("LambdaFunctionLogGroup") >= 2


@pytest.mark.parametrize("desired", [2, 0])
def test_the_model_service_waits_for_a_host_in_the_cluster(tmp_path, desired):
    """The service is created only once a host's ECS agent has registered it (the hosts signal
    the group), so the circuit breaker never sees placements fail while a GPU host boots."""
    # A fixed size (the original's config): desiredInstances hosts are launched at creation.
    _, _, data = compile_example(tmp_path, lambda t: t.replace("desiredInstances: 1",
                                                               f"desiredInstances: {desired}")
                                 .replace("maxInstances: 1", "maxInstances: 2")
                                 .replace("    minInstances: 0\n", ""))
    resources = data["Resources"]
    service = resources["cnsqdevECSService"]
    assert "cnsqdevECSAutoScalingGroup" in service["DependsOn"]
    group = resources["cnsqdevECSAutoScalingGroup"]
    rolling = group["UpdatePolicy"]["AutoScalingRollingUpdate"]
    if desired:
        assert group["CreationPolicy"]["ResourceSignal"] == {"Count": desired, "Timeout": "PT20M"}
        assert rolling["WaitOnResourceSignals"] is True
    else:  # nothing to wait for: no host is launched
        assert "CreationPolicy" not in group and rolling["WaitOnResourceSignals"] is False
    user_data = resources["cnsqdevLaunchTemplate"]["Properties"]["LaunchTemplateData"]["UserData"]
    script = user_data["Fn::Base64"]["Fn::Sub"]
    assert "curl -sf http://localhost:51678/v1/metadata | grep -q ContainerInstanceArn" in script
    assert ("cfn-signal -e 0 --stack ${AWS::StackName} --resource cnsqdevECSAutoScalingGroup"
            in script)
    # In the background: the ECS agent starts after the user data has finished.
    assert "systemd-run --no-block --unit cnsq-signal /usr/local/bin/cnsq-signal" in script

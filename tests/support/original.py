"""The original's template (tests/data/chip-n-scale-cloudformation.template.yml, MIT, with its
LICENSE beside it) as kes rendered it: the stack an upgrade starts from."""

from __future__ import annotations

from pathlib import Path

from cnsq.deploy.template import dump, load_cfn_yaml

DATA = Path(__file__).resolve().parents[1] / "data"


def original_template(vpc: str, subnets: list[str], bucket: str, key: str) -> str:
    """The original's template as kes rendered it for the stack cnsq-dev."""
    context = {
        "stackName": "cnsq-dev", "stackNoDash": "cnsqdev", "stage": "dev", "projectTag": "cnsq-dev",
        "lambdas": {"DownloadAndPredict": {
            "name": "DownloadAndPredict", "bucket": bucket, "remote": key,
            "handler": "download_and_predict.handler.handler", "memory": 512,
            "runtime": "python3.12", "concurrent": 5, "timeout": 60, "queueTrigger": True,
            "envs": {"TILE_ENDPOINT": "'https://example.com/{}/{}/{}.jpg?access_token={}'",
                     "TILE_ACCESS_TOKEN": "tok-8JmX-never-print"}}},
        "rds": {"username": "resultsadmin", "password": "pw-Zq81-never-print", "storage": 20,
                "instanceType": "db.t3.medium"},
        "vpc": vpc, "subnets": subnets, "buckets": {"internal": bucket},
        "ecs": {"availabilityZone": "us-east-1a", "maxInstances": 1, "desiredInstances": 1,
                "keyPairName": "kes-key", "instanceType": "g4dn.xlarge",
                "image": "tensorflow/serving:latest-gpu", "memory": 12000},
        "sqs": {"visibilityTimeout": 720, "maxReceiveCount": 5},
        "predictionPath": "/v1/models/your_model",
    }
    source = (DATA / "chip-n-scale-cloudformation.template.yml").read_text()
    import pybars  # a second to import: only the tests of the original's template load it

    text = str(pybars.Compiler().compile(source)(context))
    # moto cannot read an all-protocols rule without ports (AWS ignores ports for -1), a
    # ${ Name} with a space in !Sub, nor a dotted short-form !GetAtt (Res.Endpoint.Address):
    # give it the same template in the form it reads.
    text = text.replace("IpProtocol: -1", "IpProtocol: -1\n          FromPort: -1\n          ToPort: -1")
    text = text.replace("${ ", "${")
    data = load_cfn_yaml(text)
    # moto cannot update an RDS instance in place (AWS replaces this one, asking first): after
    # the update its stack has no database to read this output from, and describe_stacks fails.
    data["Outputs"].pop("dbConnectionString")
    return dump(data)

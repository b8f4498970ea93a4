"""config.yml + deployment + .env → a validated :class:`Config` (kes semantics, docs/architecture.md §3).

The file maps deployment names to settings. ``default`` is always read and the named deployment is
deep-merged over it (mappings merge recursively, lists and scalars replace). String values are
Jinja2 templates (sandboxed) rendered with the process environment, ``.env`` (which wins) and the
config itself, so values may refer to other values; what comes from the environment is data,
never rendered again. Every error names the place: ``file:line:column`` for
YAML syntax, the key path for a wrong type, an unknown key or an undefined variable.

Values that come from the environment and sit where the template passes them to CloudFormation as
``NoEcho`` parameters (``lambdas.<Name>.envs.*``, such as the tile token) become
:class:`Secret` objects: the template can only reference them, never print them.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import jinja2.meta
import yaml
from jinja2.sandbox import SandboxedEnvironment

from cnsq.compat.dotenv_lines import bindings
from cnsq.errors import ConfigError

REQUIRED = object()

# AWS facts the stack depends on, chosen so that they do not rot (docs/configuration.md: "AWS facts").
# The newest PostgreSQL major on RDS (18 since 2025); RDS resolves a major to its default minor.
DEFAULT_ENGINE_MAJOR = "18"
# The ECS GPU-optimised Amazon Linux 2023 AMI; AWS keeps the parameter pointing at the current
# build. (The Amazon Linux 2 GPU AMI reached end of life on 2026-06-30.)
DEFAULT_AMI_PARAMETER = "/aws/service/ecs/optimized-ami/amazon-linux-2023/gpu/recommended/image_id"
# GPU instance types, offline. The live account is the authority (preflight reads
# DescribeInstanceTypes' GpuInfo and decides the tasks per instance); these are hints for a config
# checked without it, so a type cnsq does not know is a warning, never a refusal. The patterns
# name EC2's conventions: NVIDIA GPUs are in the g and p families (g4dn … g7e, p3 … p6-b300,
# gr6), and the families below never have a GPU.
NVIDIA_FAMILY = re.compile(r"^(p\d+[a-z0-9-]*|g\d+[a-z0-9-]*|gr\d+[a-z0-9-]*)\.")
CPU_FAMILY = re.compile(r"^(t|m|c|r|x|z|i|d|h)\d[a-z0-9-]*\.")
# GPU families the ECS GPU AMI cannot serve a whole-GPU task on, and why (its README and
# build scripts, github.com/aws/amazon-ecs-ami).
REFUSED_GPU_FAMILIES = {
    "g4ad": "has AMD GPUs; the ECS GPU AMI drives NVIDIA GPUs only",
    "g5g": "is arm64 (Graviton); the ECS GPU AMI is built for x86_64 only",
    "g6f": ("has a fraction of a GPU: ECS places it only for a fractional GPU request, and the "
            "ECS GPU AMI's notes require memory overcommit on the host; cnsq asks for whole "
            "GPUs: use g6 (a whole L4)"),
    "gr6f": ("has a fraction of a GPU: ECS places it only for a fractional GPU request, and the "
             "ECS GPU AMI's notes require memory overcommit on the host; cnsq asks for whole "
             "GPUs: use gr6 (a whole L4)"),
}
# GPUs of the multi-GPU sizes of the families below, to run one model task per GPU offline.
# Any other size of these families has one; other families: one, until preflight asks.
MULTI_GPU = {
    "p3.8xlarge": 4, "p3.16xlarge": 8, "p3dn.24xlarge": 8, "p4d.24xlarge": 8,
    "p4de.24xlarge": 8, "p5.48xlarge": 8, "p5e.48xlarge": 8, "p5en.48xlarge": 8,
    "g4dn.12xlarge": 4, "g4dn.metal": 8, "g5.12xlarge": 4, "g5.24xlarge": 4, "g5.48xlarge": 8,
    "g6.12xlarge": 4, "g6.24xlarge": 4, "g6.48xlarge": 8, "g6e.12xlarge": 4,
    "g6e.24xlarge": 4, "g6e.48xlarge": 8,
}
MULTI_GPU_FAMILIES = {itype.split(".")[0] for itype in MULTI_GPU}

# Each leaf is (kind, default). Kinds: str, int, bool, strlist, strmap. A dict is a nested section.
LAMBDA_SCHEMA: dict[str, Any] = {
    "name": ("str", None),
    "fullName": ("str", None),
    "handler": ("str", "download_and_predict.handler.handler"),
    "timeout": ("int", 300),
    "memory": ("int", 1024),
    "runtime": ("str", "python3.12"),
    "architecture": ("str", "x86_64"),
    "source": ("str", "lambda"),
    "queueTrigger": ("bool", False),
    "concurrent": ("int", None),
    # The most calls the stack's controller may allow (reserved concurrency) when ecs.minInstances
    # asks for scaling; ``concurrent`` is then where it starts.
    "maxConcurrent": ("int", None),
    "envs": ("strmap", {}),
}

SCHEMA: dict[str, Any] = {
    "stage": ("str", "dev"),
    "stackName": ("str", REQUIRED),
    # The AWS region to deploy to; --region, AWS_REGION and AWS_DEFAULT_REGION win over it, and
    # it wins over the profile's.
    "region": ("str", None),
    "stackNoDash": ("str", None),
    "projectTag": ("str", None),
    "capabilities": ("strlist", ["CAPABILITY_NAMED_IAM"]),
    "buckets": {"internal": ("str", REQUIRED)},
    "lambdas": "lambdas",
    "rds": {
        "username": ("str", "postgres"),
        "storage": ("int", 20),
        "instanceType": ("str", "db.t3.medium"),
        # A major version alone: RDS picks its current default minor, so the value does not
        # rot when AWS retires a minor (16.9 stopped being creatable in October 2026).
        "engineVersion": ("str", DEFAULT_ENGINE_MAJOR),
        "publiclyAccessible": ("bool", False),
        "allowedCidr": ("str", ""),
        "backupRetentionDays": ("int", 7),
        "deletionProtection": ("bool", False),
        # A snapshot to create the database from: how an adopted database (the original's, kept
        # in place) moves into the stack's private subnets, encrypted. Kept in the config after.
        "restoreFromSnapshot": ("str", ""),
    },
    # No vpc: the stack creates its own network (two zones, private subnets behind a NAT).
    "vpc": ("str", None),
    "subnets": ("strlist", []),
    # Dual-stack: imagery that answers over IPv6 leaves through an egress-only internet gateway
    # (free) instead of the NAT gateway ($0.045/GB). Unset: on for the network the stack creates,
    # off for a given one (set true once its subnets have IPv6 blocks and a ::/0 route).
    "ipv6": ("bool", None),
    # Imagery the worker reads itself instead of an XYZ endpoint: a COG's URL (https:// or
    # s3://) or a list read as a mosaic, or a STAC source (an API's search or a static
    # catalog); the bands, their rescale or percentile stretch, the model's tile size and the
    # image's encoding (png, or jpeg: a tenth of the bytes, lossy).
    "imagery": {
        "cog": ("any", None),
        "stac": ("any", None),
        "bands": ("any", None),
        "rescale": ("any", None),
        "stretch": ("any", None),
        "tileSize": ("any", 256),
        "format": ("any", "png"),
        # s3:// reads billed to this account (requester-pays buckets, such as USGS's Landsat).
        "requesterPays": ("bool", False),
    },
    "ecs": {
        "availabilityZone": ("str", None),
        "maxInstances": ("int", 1),
        "desiredInstances": ("int", 1),
        # Set: the stack scales the hosts with the backlog, from this many up to maxInstances,
        # and its controller sets the Lambda concurrency. Unset: the original's fixed size.
        "minInstances": ("int", None),
        "idleMinutes": ("int", 2),
        "keyPairName": ("str", None),
        "instanceType": ("str", "p3.2xlarge"),
        "image": ("str", "tensorflow/serving:latest-gpu"),
        "memory": ("int", 16000),
        "gpus": ("int", 1),
        "amiParameter": ("str", DEFAULT_AMI_PARAMETER),
        "modelName": ("str", None),
        "batching": ("bool", True),
        "allowedCidr": ("str", ""),
        "tasksPerInstance": ("int", None),
        # The share of GPU hosts on Spot, 0 to 100 (true: 100): a mixed-instances group over
        # spotInstanceTypes (unset: the same size of g4dn, g5 and g6 when the type is one of
        # theirs), price-capacity-optimized, drained by ECS on the interruption notice.
        "spot": ("percent", 0),
        "spotInstanceTypes": ("strlist", []),
    },
    "sqs": {
        "visibilityTimeout": ("int", 1800),
        "maxReceiveCount": ("int", 5),
        "batchSize": ("int", 10),
        "maxBatchingWindow": ("int", 0),
    },
    "logs": {"retentionDays": ("int", 30)},
    "predictionPath": ("str", REQUIRED),
}

# Where a value from the environment is passed as a NoEcho parameter instead of being inlined.
# (rds.username is not a secret; the password is RDS's own, never the config's.)
SECRET_SLOTS = (re.compile(r"^lambdas\.[^.]+\.envs\.[^.]+$"),)
SECRET_LOOKING = re.compile(r"PASSWORD|SECRET|TOKEN|PRIVATE", re.IGNORECASE)

SUPPORTED_RUNTIMES = ("python3.11", "python3.12", "python3.13")
RETIRED_RUNTIME = re.compile(r"^(python2\.7|python3\.[0-9])$|^nodejs")
LAMBDA_NAME = re.compile(r"^[A-Za-z0-9]+$")
STACK_NAME = re.compile(r"[A-Za-z][A-Za-z0-9-]{0,127}")


@dataclass(frozen=True)
class Secret:
    """A value that must never be written into the compiled template, S3 or the terminal.

    ``param`` is the NoEcho CloudFormation parameter that carries it; ``path`` the config key.
    Rendering it as text is refused, so a template can only use it through ``!Ref``.
    """

    path: str
    param: str
    value: str = field(repr=False)

    def __str__(self) -> str:
        raise jinja2.TemplateError(
            f"{self.path} is a secret and cannot be written into the template; "
            f"reference it with !Ref {self.param} (or the cfn_value filter)"
        )

    def __repr__(self) -> str:
        return f"Secret({self.path!r}, param={self.param!r})"


@dataclass
class Config:
    """A validated configuration: ``values`` for the template, ``secrets`` for parameters."""

    path: Path
    deployment: str
    values: dict[str, Any]
    secrets: dict[str, Secret]
    warnings: list[str]
    # Keys whose values cnsq chose without the account (the tasks per GPU instance): preflight
    # replaces them with what the account says (:meth:`decide`).
    guessed: set[str] = field(default_factory=set)

    def decide(self, key: str, value: Any) -> bool:
        """Set a guessed ``section.name`` key to the account's answer; whether it changed.
        A key the user wrote is never replaced."""
        if key not in self.guessed:
            return False
        section, name = key.split(".")
        changed = self.values[section][name] != value
        self.values[section][name] = value
        self.guessed.discard(key)
        return changed

    @property
    def stack_name(self) -> str:
        return self.values["stackName"]

    @property
    def bucket(self) -> str:
        return self.values["buckets"]["internal"]

    @property
    def project_dir(self) -> Path:
        """The folder that holds ``config/``: relative ``source`` paths start here."""
        parent = self.path.resolve().parent
        return parent.parent if parent.name == "config" else parent

    def secret_parameters(self) -> dict[str, str]:
        """NoEcho parameter name → value, for create_change_set."""
        return {s.param: s.value for s in self.secrets.values()}


# ---------------------------------------------------------------------------------------------
# Reading files


# libyaml's parser where PyYAML has it (its wheels do): the same YAML, parsed several times faster.
SafeYamlLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _LineLoader(SafeYamlLoader):  # type: ignore[valid-type,misc]
    """A safe loader whose nodes keep the line of each key (for error messages)."""


def _compose_lines(node: yaml.Node, prefix: str, out: dict[str, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
            out[key] = key_node.start_mark.line + 1
            _compose_lines(value_node, key, out)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            # kes wrote lambdas as a list of one-key mappings: keep the key path without an index.
            _compose_lines(item, prefix, out)


def load_yaml(path: Path) -> tuple[Any, dict[str, int]]:
    """Parse ``path`` and return (data, {key path: line}).

    Raises:
        ConfigError: the file is missing or is not valid YAML (with file:line:column).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: no such file (copy config/config.example.yml to config/config.yml)"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    loader = _LineLoader(text)
    try:  # parsed once: the nodes give each key's line, the data is built from them
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML: {exc.problem or exc.context}") from None
    finally:
        loader.dispose()
    lines: dict[str, int] = {}
    if node is not None:
        _compose_lines(node, "", lines)
    return data, lines




def parse_dotenv(path: Path) -> dict[str, str]:
    """Read a dotenv file with python-dotenv's parser (``KEY=value``, ``export``, quotes and
    their escapes, ``#`` comments, multi-line quoted values). Values are data: no ``${VAR}``
    interpolation, no template.

    Raises:
        ConfigError: a line is not ``KEY=value`` (with file:line, never the line itself: it may
            hold a secret; its first word names the key).
    """
    values: dict[str, str] = {}
    for binding in bindings(path.read_text(encoding="utf-8")):
        if binding.error:
            line = binding.text.strip()
            first = re.match(r"(?:export\s+)?([^\s=:]*)", line)
            start = first.group(1)[:40] if first else ""
            raise ConfigError(f"{path}:{binding.line}: expected KEY=value"
                              + (f" (the line starts with {start!r})" if start else ""))
        if binding.key is not None:
            values[binding.key] = binding.value or ""
    return values


# ---------------------------------------------------------------------------------------------
# Merging


def normalize_lambdas(section: Any, where: str) -> Any:
    """Accept kes's list of one-key mappings (``- DownloadAndPredict: {...}``) as a mapping."""
    if not isinstance(section, list):
        return section
    merged: dict[str, Any] = {}
    for item in section:
        if not isinstance(item, dict) or len(item) != 1:
            raise ConfigError(
                f"{where}: expected each list item to be one 'Name: settings' mapping, got {item!r}"
            )
        merged.update(item)
    return merged


def deep_merge(base: Any, override: Any) -> Any:
    """Mappings merge recursively; lists and scalars in ``override`` replace those in ``base``."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for key, value in override.items():
            out[key] = deep_merge(base[key], value) if key in base else copy.deepcopy(value)
        return out
    return copy.deepcopy(override)


# ---------------------------------------------------------------------------------------------
# Rendering


def _jinja() -> jinja2.Environment:
    # Sandboxed: a config value is a template of the user's, but no template may reach Python's
    # internals (``{{ cycler.__init__.__globals__.os }}`` is refused, not run).
    return SandboxedEnvironment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)


def _walk_strings(value: Any, path: str, fn) -> Any:
    if isinstance(value, dict):
        return {k: _walk_strings(v, f"{path}.{k}" if path else str(k), fn) for k, v in value.items()}
    if isinstance(value, list):
        return [_walk_strings(v, path, fn) for v in value]
    if isinstance(value, str):
        return fn(path, value)
    return value


class _Resolver:
    """Renders each string of the config once, on demand, with the environment and the config.

    A value may refer to another (``{{ stackName }}-results``), which is rendered first, in any
    order, and a loop is an error. What comes from the environment (``.env`` and the process's)
    is data: substituted as it is and never rendered again, so a token holding ``{{`` stays that
    token and runs nothing. An error names the key and the variable, never a value.
    """

    def __init__(self, config: dict, env: Mapping[str, str], jenv: jinja2.Environment,
                 errors: list[str], env_path: Path):
        self.config, self.env, self.jenv = config, env, jenv
        self.errors, self.env_path = errors, env_path
        self.done: dict[str, str] = {}
        self.active: list[str] = []

    def value(self, path: str, raw: Any) -> Any:
        if isinstance(raw, dict):
            return _Section(self, path, raw)
        if isinstance(raw, list):
            return [self.value(f"{path}[{i}]", item) for i, item in enumerate(raw)]
        if isinstance(raw, str):
            return self.string(path, raw)
        return raw

    def string(self, path: str, text: str) -> str:
        if "{" not in text:
            return text
        if path in self.done:
            return self.done[path]
        key = re.sub(r"\[\d+\]", "", path)  # a list item is reported by its list's key
        if path in self.active:
            loop = " → ".join(self.active[self.active.index(path):] + [path])
            self.errors.append(f"{key}: refers to itself ({loop})")
            return text
        self.active.append(path)
        try:
            template = self.jenv.from_string(text)
            # Jinja reads a context's names through the mapping's methods: _Root renders each
            # value when it is first asked for.
            context = template.new_context(_Root(self), shared=True)  # type: ignore[arg-type]
            rendered = self.jenv.concat(template.root_render_func(context))  # type: ignore[attr-defined]
        except jinja2.UndefinedError as exc:
            self.errors.append(f"{key}: undefined variable: {exc.message} (set it in "
                               f"{self.env_path} or the environment, or define the key)")
            rendered = text
        except jinja2.TemplateError as exc:
            self.errors.append(f"{key}: cannot render its template: {exc}")
            rendered = text
        finally:
            self.active.pop()
        self.done[path] = rendered
        return rendered

    def materialize(self, raw: Any, path: str = "") -> Any:
        if isinstance(raw, dict):
            return {k: self.materialize(v, f"{path}.{k}" if path else str(k)) for k, v in raw.items()}
        if isinstance(raw, list):
            return [self.materialize(v, f"{path}[{i}]") for i, v in enumerate(raw)]
        return self.string(path, raw) if isinstance(raw, str) else raw


class _Section(Mapping):
    """A config mapping as templates see it: each value rendered when it is read."""

    def __init__(self, resolver: _Resolver, path: str, raw: dict):
        self._resolver, self._path, self._raw = resolver, path, raw

    def __getitem__(self, key: str) -> Any:
        raw = self._raw[key]
        return self._resolver.value(f"{self._path}.{key}" if self._path else str(key), raw)

    def __iter__(self):
        return iter(self._raw)

    def __len__(self) -> int:
        return len(self._raw)


class _Root(_Section):
    """The top level: the config's keys, then the environment's (as data)."""

    def __init__(self, resolver: _Resolver):
        super().__init__(resolver, "", resolver.config)

    def __contains__(self, key: object) -> bool:
        return key in self._raw or key in self._resolver.env

    def __getitem__(self, key: str) -> Any:
        if key in self._raw:
            return super().__getitem__(key)
        return self._resolver.env[key]

    def __iter__(self):
        return iter({**dict.fromkeys(self._resolver.env), **dict.fromkeys(self._raw)})

    def __len__(self) -> int:
        return len(set(self._raw) | set(self._resolver.env))


def _raise_all(errors: list[str], path: Path) -> None:
    unique = list(dict.fromkeys(errors))
    if len(unique) == 1:
        raise ConfigError(unique[0])
    if unique:
        raise ConfigError(f"{len(unique)} problems in {path}:\n  " + "\n  ".join(unique))


def _env_references(config: dict, env: dict[str, str], jenv) -> dict[str, set[str]]:
    """Key path → the environment variables its (unrendered) template refers to."""
    found: dict[str, set[str]] = {}

    def visit(path: str, text: str) -> str:
        if "{" in text:
            try:
                names = jinja2.meta.find_undeclared_variables(jenv.parse(text))
            except jinja2.TemplateSyntaxError as exc:
                raise ConfigError(f"{path}: template syntax error: {exc}") from None
            hits = {n for n in names if n in env and n not in config}
            if hits:
                found[path] = hits
        return text

    _walk_strings(config, "", visit)
    return found


def _param_name(path: str) -> str:
    """``lambdas.DownloadAndPredict.envs.TILE_ACCESS_TOKEN`` → ``SecretLambdasDownloadAndP…``."""
    return "Secret" + "".join(p[:1].upper() + p[1:] for p in re.split(r"[^A-Za-z0-9]+", path) if p)


# ---------------------------------------------------------------------------------------------
# Validation


def _did_you_mean(key: str, choices) -> str:
    close = difflib.get_close_matches(key, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


class _Validator:
    def __init__(self, lines: dict[str, int], section: str, path: Path):
        self.lines = lines
        self.section = section
        self.path = path
        self.errors: list[str] = []

    def where(self, key: str) -> str:
        for prefix in (self.section, "default"):
            line = self.lines.get(f"{prefix}.{key}")
            if line:
                return f"{self.path}:{line}: {key}"
        return f"{self.path}: {key}"

    def leaf(self, key: str, kind: str, value: Any) -> Any:
        if kind == "str":
            if isinstance(value, (dict, list)):
                raise ConfigError(f"{self.where(key)}: expected a string, got {_kind(value)}")
            return value if isinstance(value, str) else str(value)
        if kind == "int":
            if isinstance(value, bool) or not (
                isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit())
            ):
                raise ConfigError(f"{self.where(key)}: expected an integer, got {value!r}")
            return int(value)
        if kind == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
                return value.lower() in ("true", "yes")
            raise ConfigError(f"{self.where(key)}: expected true or false, got {value!r}")
        if kind == "any":  # checked as a whole by its section's own check
            return value
        if kind == "percent":
            if isinstance(value, bool):
                return 100 if value else 0
            if isinstance(value, int) and 0 <= value <= 100:
                return value
            if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no"):
                return 100 if value.strip().lower() in ("true", "yes") else 0
            if isinstance(value, str) and value.strip().isdigit() and int(value) <= 100:
                return int(value)
            raise ConfigError(f"{self.where(key)}: expected true, false or a percentage from 0 "
                              f"to 100, got {value!r}")
        if kind == "strlist":
            if not isinstance(value, list):
                raise ConfigError(f"{self.where(key)}: expected a list, got {_kind(value)}")
            return [self.leaf(key, "str", v) for v in value]
        if kind == "strmap":
            if value is None:
                return {}
            if not isinstance(value, dict):
                raise ConfigError(f"{self.where(key)}: expected a mapping, got {_kind(value)}")
            return {str(k): v if isinstance(v, Secret) else self.leaf(f"{key}.{k}", "str", v)
                    for k, v in value.items()}
        raise AssertionError(kind)

    def section_(self, prefix: str, schema: dict, value: Any) -> dict:
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{self.where(prefix)}: expected a mapping, got {_kind(value)}")
        for key in value:
            if key not in schema:
                name = f"{prefix}.{key}" if prefix else str(key)
                self.errors.append(
                    f"{self.where(name)}: unknown key{_did_you_mean(str(key), schema)}")
        out: dict[str, Any] = {}
        for key, spec in schema.items():
            name = f"{prefix}.{key}" if prefix else key
            try:
                out[key] = self._value(name, key, spec, value)
            except ConfigError as exc:  # every problem at once, not one per run
                self.errors.append(str(exc))
        return out

    def _value(self, name: str, key: str, spec: Any, value: dict) -> Any:
        if spec == "lambdas":
            return {
                lname: self.section_(f"{name}.{lname}", LAMBDA_SCHEMA, lvalue)
                for lname, lvalue in (value.get(key) or {}).items()
            }
        if isinstance(spec, dict):
            return self.section_(name, spec, value.get(key))
        kind, default = spec
        if key not in value or value[key] is None:
            if default is REQUIRED:
                raise ConfigError(f"{self.where(name)}: required key is missing")
            return copy.deepcopy(default)
        if isinstance(value[key], Secret):
            return value[key]
        return self.leaf(name, kind, value[key])


def _kind(value: Any) -> str:
    kinds: dict[type, str] = {dict: "a mapping", list: "a list"}
    return kinds.get(type(value), repr(value))


def _check_values(values: dict, where, guessed: set[str]) -> list[str]:
    """Refuse what AWS no longer accepts; return warnings for what works but is unwise.
    ``guessed`` receives the keys whose values were chosen offline for the account to decide."""
    warnings: list[str] = []
    rds, ecs, sqs = values["rds"], values["ecs"], values["sqs"]
    engine = rds["engineVersion"]
    major = engine.split(".")[0]
    if not re.fullmatch(r"\d+(\.\d+)?", engine):
        raise ConfigError(f"{where('rds.engineVersion')}: expected a major version like "
                          f"'{DEFAULT_ENGINE_MAJOR}', got {engine!r}")
    if int(major) < 14:
        raise ConfigError(
            f"{where('rds.engineVersion')}: PostgreSQL {engine} is no longer offered by RDS; "
            f"use '{DEFAULT_ENGINE_MAJOR}'"
        )
    if "." in engine:
        warnings.append(
            f"rds.engineVersion: {engine} pins a minor version, which RDS stops creating when it "
            f"retires it; write the major alone ('{major}') and RDS keeps the minor current"
        )
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]{0,62}", rds["username"]) or rds["username"] in (
            "rdsadmin", "rdsrepladmin"):
        raise ConfigError(
            f"{where('rds.username')}: RDS needs 1 to 63 letters, digits or underscores starting "
            f"with a letter, and not a name RDS reserves; got {rds['username']!r}"
        )
    _check_network(values, where, warnings)
    itype = values["rds"]["instanceType"]
    if itype.startswith("db.t2."):
        raise ConfigError(
            f"{where('rds.instanceType')}: {itype} does not run PostgreSQL {major} on RDS; "
            f"use {itype.replace('db.t2.', 'db.t3.')} (or a db.t4g class)"
        )
    prediction_path = values["predictionPath"]
    if not prediction_path.startswith("/") or prediction_path.endswith(":predict"):
        raise ConfigError(
            f"{where('predictionPath')}: expected a path like '/v1/models/NAME' "
            f"(no host, no ':predict'), got {prediction_path!r}"
        )
    vis = values["sqs"]["visibilityTimeout"]
    for name, spec in values["lambdas"].items():
        if not LAMBDA_NAME.match(name):
            raise ConfigError(f"{where('lambdas.' + name)}: a Lambda name may use only A-Z, a-z, 0-9")
        runtime = spec["runtime"]
        key = f"lambdas.{name}.runtime"
        if RETIRED_RUNTIME.match(runtime):
            raise ConfigError(
                f"{where(key)}: runtime {runtime} is no longer accepted by AWS Lambda; "
                "use python3.12"
            )
        if runtime not in SUPPORTED_RUNTIMES:
            warnings.append(f"{key}: {runtime} is not one of {', '.join(SUPPORTED_RUNTIMES)}")
        if spec["architecture"] not in ("x86_64", "arm64"):
            raise ConfigError(
                f"{where(f'lambdas.{name}.architecture')}: expected x86_64 or arm64, "
                f"got {spec['architecture']!r}"
            )
        if spec["queueTrigger"]:
            timeout = spec["timeout"]
            if vis < timeout:
                raise ConfigError(
                    f"{where('sqs.visibilityTimeout')}: {vis}s is shorter than the timeout of "
                    f"lambdas.{name} ({timeout}s); AWS refuses such an event source mapping"
                )
            if vis < 6 * timeout:
                warnings.append(
                    f"sqs.visibilityTimeout: {vis}s is below 6x lambdas.{name}.timeout "
                    f"({6 * timeout}s), AWS's recommendation for SQS event sources"
                )
            if not 1 <= sqs["batchSize"] <= 10000:
                raise ConfigError(f"{where('sqs.batchSize')}: expected 1 to 10000")
            if sqs["batchSize"] > 10 and sqs["maxBatchingWindow"] < 1:
                raise ConfigError(
                    f"{where('sqs.batchSize')}: {sqs['batchSize']} records per call needs "
                    "sqs.maxBatchingWindow of at least 1 (seconds); Lambda refuses a batch size "
                    "above 10 without a batching window"
                )
    _check_gpus(ecs, where, warnings, guessed)
    _check_spot(ecs, where)
    _check_imagery(values, where)
    _check_scaling(values, where)
    return warnings


def raster_imagery(values: dict) -> bool:
    """Whether the config's worker reads COG or STAC imagery itself (``imagery.cog`` or
    ``imagery.stac``), not an XYZ endpoint: the raster libraries go into its package."""
    imagery = values.get("imagery") or {}
    return bool(imagery.get("cog") or imagery.get("stac"))


def _check_imagery(values: dict, where) -> None:
    """``imagery:`` as the worker will read it (its own check), normalised for the template."""
    from download_and_predict.cog import Imagery
    from download_and_predict.errors import SettingsError

    raw = {k: v for k, v in values["imagery"].items() if v is not None}
    if not raw.get("cog") and raw.get("stac") is None:
        values["imagery"] = {}
        return
    try:
        values["imagery"] = Imagery.from_values(raw, "imagery").as_values()
    except SettingsError as exc:
        key, _, rest = str(exc).partition(": ")
        raise ConfigError(f"{where(key)}: {rest}") from None


# Single-GPU sizes whose same size in another of these families has the same GPU count and
# memory of at least the first's (T4, A10G, L4: one GPU each up to 16xlarge): the Spot group's
# default types, so price-capacity-optimized has pools to choose from.
SPOT_FAMILIES = ("g4dn", "g5", "g6")
SPOT_SIZES = ("xlarge", "2xlarge", "4xlarge", "8xlarge", "16xlarge")


def _gpus_of(itype: str) -> int | None:
    family = itype.split(".")[0]
    if family in MULTI_GPU_FAMILIES or family in SPOT_FAMILIES:
        return MULTI_GPU.get(itype, 1)
    return None


def _check_spot(ecs: dict, where) -> None:
    """Spot hosts: types with the instance type's GPU count (a task asks for GPUs by count)."""
    itype = ecs["instanceType"]
    if not ecs["spot"]:
        return
    if not ecs["spotInstanceTypes"]:
        family, _, size = itype.partition(".")
        siblings = [f"{f}.{size}" for f in SPOT_FAMILIES if f != family] \
            if family in SPOT_FAMILIES and size in SPOT_SIZES else []
        ecs["spotInstanceTypes"] = [itype, *siblings]
    elif itype not in ecs["spotInstanceTypes"]:
        ecs["spotInstanceTypes"] = [itype, *ecs["spotInstanceTypes"]]
    if len(ecs["spotInstanceTypes"]) > 40:
        raise ConfigError(f"{where('ecs.spotInstanceTypes')}: at most 40 types (a mixed-instances "
                          "group's overrides)")
    wanted = _gpus_of(itype)
    for other in ecs["spotInstanceTypes"]:
        found = _gpus_of(other)
        if wanted is not None and found is not None and found != wanted:
            raise ConfigError(
                f"{where('ecs.spotInstanceTypes')}: {other} has {found} GPU(s) and {itype} "
                f"{wanted}: the group's types need the same GPU count (each task asks for "
                f"{ecs['gpus']})")


def _check_scaling(values: dict, where) -> None:
    ecs = values["ecs"]
    low = ecs["minInstances"]
    if low is None:
        return
    if not 0 <= low <= ecs["maxInstances"]:
        raise ConfigError(f"{where('ecs.minInstances')}: expected 0 to ecs.maxInstances "
                          f"({ecs['maxInstances']}), got {low}")
    if ecs["idleMinutes"] < 1:
        raise ConfigError(f"{where('ecs.idleMinutes')}: expected 1 or more")
    for name, spec in values["lambdas"].items():
        high, start = spec["maxConcurrent"], spec["concurrent"]
        if high is not None and not 2 <= high <= 1000:
            raise ConfigError(f"{where(f'lambdas.{name}.maxConcurrent')}: expected 2 to 1000 "
                              "(an event source mapping's maximum concurrency)")
        if high is not None and start is not None and start > high:
            raise ConfigError(f"{where(f'lambdas.{name}.concurrent')}: {start} is above "
                              f"lambdas.{name}.maxConcurrent ({high})")


def scaling_summary(values: dict) -> str:
    """One line: does the stack scale itself, or keep the original's fixed size."""
    ecs = values["ecs"]
    if ecs["minInstances"] is None:
        return (f"ecs: a fixed size of {ecs['desiredInstances']} instance(s), Lambda concurrency "
                "as configured (set ecs.minInstances to scale with the backlog)")
    return (f"ecs: scales with the backlog, {ecs['minInstances']} to {ecs['maxInstances']} "
            f"instance(s), down to {ecs['minInstances']} after {ecs['idleMinutes']} idle minutes; "
            "the controller sets the Lambda concurrency (ecs.desiredInstances is not used)")


def _check_network(values: dict, where, warnings: list[str]) -> None:
    """An existing VPC needs two subnets; anything opened to the internet is said aloud."""
    if values["vpc"] and len(values["subnets"]) < 2:
        raise ConfigError(
            f"{where('subnets')}: vpc {values['vpc']} needs at least two private subnets in two "
            "availability zones (or leave vpc and subnets out and the stack creates the network)"
        )
    if values["subnets"] and not values["vpc"]:
        raise ConfigError(f"{where('vpc')}: subnets are given but no vpc; name the VPC that holds "
                          "them, or leave both out and the stack creates the network")
    for key in ("rds.allowedCidr", "ecs.allowedCidr"):
        section, name = key.split(".")
        cidr = values[section][name]
        if cidr and not re.fullmatch(r"\d{1,3}(\.\d{1,3}){3}/\d{1,2}", cidr):
            raise ConfigError(f"{where(key)}: expected an IPv4 CIDR like 203.0.113.0/24, got {cidr!r}")
        if cidr.endswith("/0"):
            warnings.append(f"{key}: {cidr} opens the {'database' if section == 'rds' else 'model endpoint'}"
                            " to every address on the internet")
    if values["rds"]["publiclyAccessible"]:
        warnings.append("rds.publiclyAccessible: true gives the database a public address; only "
                        "rds.allowedCidr and the Lambda may connect, but prefer a private database "
                        "(cnsq setup and download reach it through the stack's admin function)")


def _check_gpus(ecs: dict, where, warnings: list[str], guessed: set[str]) -> None:
    """A GPU task on a GPU-less instance never starts: CloudFormation would wait for hours.

    Offline, only what is certain is refused (a family with no GPU, or one the ECS GPU AMI
    cannot serve); a type cnsq does not know is a warning, and preflight asks the account.
    """
    itype = ecs["instanceType"]
    family = itype.split(".")[0]
    known_gpu = bool(NVIDIA_FAMILY.match(itype)) and family not in REFUSED_GPU_FAMILIES
    if ecs["gpus"] >= 1:
        if family in REFUSED_GPU_FAMILIES:
            raise ConfigError(f"{where('ecs.instanceType')}: {itype} {REFUSED_GPU_FAMILIES[family]}")
        if CPU_FAMILY.match(itype):
            raise ConfigError(
                f"{where('ecs.instanceType')}: {itype} has no NVIDIA GPU that ECS can schedule, "
                f"but ecs.gpus is {ecs['gpus']}; use a GPU type (g4dn, g5, g6, p3, p4d, p5 …) or "
                "set ecs.gpus: 0 to serve on the CPU"
            )
        if not known_gpu:
            warnings.append(
                f"ecs.instanceType: cnsq does not know {itype} as an NVIDIA GPU type; the account "
                "is asked at deploy (preflight reads its GPUs from DescribeInstanceTypes)")
    per_instance = MULTI_GPU.get(itype, 1) if known_gpu else 1
    if ecs["gpus"] > per_instance:
        if family in MULTI_GPU_FAMILIES:
            raise ConfigError(f"{where('ecs.gpus')}: {itype} has {per_instance} GPU(s); a task "
                              f"cannot ask for {ecs['gpus']}")
        per_instance = ecs["gpus"]  # not known offline: preflight checks it against the account
    if not ecs["gpus"] and ecs["amiParameter"] == DEFAULT_AMI_PARAMETER:
        # A CPU model server runs on the standard ECS AMI, not the GPU one.
        ecs["amiParameter"] = DEFAULT_AMI_PARAMETER.replace("/gpu/", "/")
    if ecs["tasksPerInstance"] is None:
        ecs["tasksPerInstance"] = per_instance // ecs["gpus"] if ecs["gpus"] else 1
        if ecs["gpus"]:
            guessed.add("ecs.tasksPerInstance")
    if ecs["tasksPerInstance"] < 1:
        raise ConfigError(f"{where('ecs.tasksPerInstance')}: expected 1 or more")


# ---------------------------------------------------------------------------------------------
# The entry point


def load_config(
    path: str | Path,
    deployment: str | None = None,
    env_file: str | Path | None = None,
    stack: str | None = None,
    environ: dict[str, str] | None = None,
) -> Config:
    """Load, merge, render and validate a kes-style config.yml.

    Args:
        path: config.yml.
        deployment: the section merged over ``default`` (None: ``default`` alone).
        env_file: a dotenv file; None reads ``.env`` next to the config if it exists.
        stack: overrides ``stackName`` (before rendering, so derived values follow).
        environ: the process environment (``os.environ`` when None).

    Raises:
        ConfigError: anything wrong, with the place it is wrong.
    """
    path = Path(path)
    data, lines = load_yaml(path)
    if not isinstance(data, dict) or "default" not in data:
        raise ConfigError(f"{path}: expected a mapping with a 'default' section")
    sections = data
    if deployment and deployment != "default" and deployment not in sections:
        names = ", ".join(sorted(k for k in sections if k != "default")) or "none"
        raise ConfigError(
            f"{path}: no deployment '{deployment}'{_did_you_mean(deployment, sections)} "
            f"(deployments: {names})"
        )
    merged: dict[str, Any] = {}
    for name in ["default"] + ([deployment] if deployment and deployment != "default" else []):
        section = sections[name] or {}
        if not isinstance(section, dict):
            raise ConfigError(f"{path}: section '{name}' must be a mapping")
        section = dict(section)
        if "lambdas" in section:
            section["lambdas"] = normalize_lambdas(section["lambdas"], f"{path}: {name}.lambdas")
        merged = deep_merge(merged, section)
    if stack:
        merged["stackName"] = stack

    env_path = Path(env_file) if env_file else path.parent / ".env"
    dotenv: dict[str, str] = {}
    if env_file and not env_path.exists():
        raise ConfigError(f"{env_path}: no such env file")
    if env_path.exists():
        dotenv = parse_dotenv(env_path)
    env = {**(os.environ if environ is None else environ), **dotenv}

    # The master password is RDS's own (ManageMasterUserPassword): an old config's value is
    # dropped unrendered, so it reaches neither the template nor a parameter, and an old .env
    # without it still loads.
    old_password = isinstance(merged.get("rds"), dict) and merged["rds"].pop("password", None)
    jenv = _jinja()
    references = _env_references(merged, env, jenv)
    render_errors: list[str] = []
    rendered = _Resolver(merged, env, jenv, render_errors, env_path).materialize(merged)
    _raise_all(render_errors, path)

    secrets: dict[str, Secret] = {}

    def mark(key_path: str, text: str) -> Any:
        in_slot = any(p.match(key_path) for p in SECRET_SLOTS)
        names = references.get(key_path, set())
        if in_slot and names:
            secret = Secret(key_path, _param_name(key_path), text)
            secrets[key_path] = secret
            return secret
        looking = sorted(n for n in names if SECRET_LOOKING.search(n))
        if looking:
            raise ConfigError(
                f"{key_path}: uses {', '.join(looking)}, which looks like a secret, in a place "
                "that would be written into the template; secrets belong in lambdas.<Name>.envs, "
                "which are passed as NoEcho parameters"
            )
        return text

    marked = _walk_strings(rendered, "", mark)
    section_name = deployment or "default"
    validator = _Validator(lines, section_name, path)
    values = validator.section_("", SCHEMA, marked)
    _raise_all(validator.errors, path)

    if not STACK_NAME.fullmatch(values["stackName"]):
        # As CloudFormation requires; it also names files under .cnsq/ and keys in S3.
        raise ConfigError(f"{validator.where('stackName')}: a stack name is a letter, then up to "
                          f"127 letters, digits or hyphens; got {values['stackName'][:140]!r}")
    values["stackNoDash"] = values["stackNoDash"] or re.sub(r"[^A-Za-z0-9]", "", values["stackName"])
    values["projectTag"] = values["projectTag"] or values["stackName"]
    values["ecs"]["modelName"] = values["ecs"]["modelName"] or _model_name(values["predictionPath"])
    for name, spec in values["lambdas"].items():
        spec["name"] = spec["name"] or name
        spec["fullName"] = spec["fullName"] or f"{values['stackName']}-{spec['name']}"
    guessed: set[str] = set()
    warnings = _check_values(values, validator.where, guessed)
    if old_password:
        warnings.append("rds.password is no longer used: RDS creates the master password and "
                        "keeps it in Secrets Manager (remove it from the config and .env)")
    return Config(path, section_name, values, secrets, warnings, guessed)


# What config.example.yml and .env.sample hold until the user fills them in, and what to put.
PLACEHOLDERS = {
    "your-bucket": "an S3 bucket of yours in the deploy region",
    "your-key-pair": "a key pair of yours, or no keyPairName at all (the hosts are reachable "
                     "through SSM Session Manager)",
    "your_model": "your model's path on TF Serving (`cnsq model` prints it)",
    "//example.com/": "your imagery's XYZ URL template",
    "your-token": "your imagery's token (in config/.env)",
}


def placeholders(config: Config) -> list[str]:
    """One line per value still holding the example's placeholder, with its key and what to put
    there: a config that would deploy and fail (validate and deploy refuse it; compile does not).
    A secret's value is never printed, only its key."""
    found: list[str] = []

    derived = {"stackNoDash", "projectTag", "ecs.modelName"}  # follow other keys: said there

    def visit(path: str, value: Any) -> Any:
        if path in derived:
            return value
        text = value.value if isinstance(value, Secret) else value
        for placeholder, what in PLACEHOLDERS.items():
            if isinstance(text, str) and placeholder in text:
                # A secret's value is never shown, not even a placeholder (it would be masked).
                shown = "placeholder" if isinstance(value, Secret) else repr(placeholder.strip("/"))
                found.append(f"{path}: still the example's {shown}: put {what}")
        return value

    def walk(value: Any, path: str) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(item, f"{path}.{key}" if path else str(key))
        elif isinstance(value, list):
            for item in value:
                walk(item, path)
        else:
            visit(path, value)

    walk(config.values, "")
    return list(dict.fromkeys(found))


def _model_name(prediction_path: str) -> str:
    """``/v1/models/your_model`` → ``your_model`` (TF Serving's MODEL_NAME)."""
    match = re.search(r"/models/([^/:]+)", prediction_path)
    return match.group(1) if match else "model"

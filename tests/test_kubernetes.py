"""deploy/kubernetes: every object is valid against the Kubernetes schemas (kubernetes-validate,
offline, strict: unknown fields are errors), every command line parses with the real ``distill``
CLI, the student's reader config loads, and what the manifests expect is what docs/kubernetes.md
tells the user to create. (No cluster runs here.)"""

from __future__ import annotations

import re
from pathlib import Path

import click
import kubernetes_validate
import pytest
import yaml

from distill_reader.cli import main
from distill_reader.config import load_config
from distill_reader.discovery.client import parse_endpoints
from distill_reader.discovery.stores.base import parse_store_url

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy" / "kubernetes"
K8S_VERSION = "1.30.0"  # the oldest Kubernetes release still maintained when this was written
MANIFESTS = sorted(p.name for p in DEPLOY.glob("*.yaml") if p.name != "kustomization.yaml")


def objects(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((DEPLOY / name).read_text()) if doc]


def containers(obj: dict) -> list[dict]:
    spec = obj.get("spec", {})
    pod = spec.get("template", {}).get("spec", {}) if "template" in spec else {}
    return pod.get("containers", []) + pod.get("initContainers", [])


def all_objects() -> list[dict]:
    return [obj for name in MANIFESTS for obj in objects(name)]


def parse_cli(args: list[str]) -> click.Context:
    """Parse ``distill ARGS`` down to the leaf command (options converted and checked, nothing run)."""
    command: click.Command = main
    ctx = None
    name = "distill"
    while isinstance(command, click.Group):
        ctx = command.make_context(name, list(args), parent=ctx)
        rest = [*ctx._protected_args, *ctx.args]
        name, command, args = command.resolve_command(ctx, rest)
    return command.make_context(name, list(args), parent=ctx)


@pytest.mark.parametrize("name", MANIFESTS)
def test_valid_against_the_kubernetes_schemas(name):
    for obj in objects(name):
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == MANIFESTS


def test_command_lines_parse_with_the_real_cli():
    seen = set()
    for obj in all_objects():
        for container in containers(obj):
            if container.get("command") != ["distill"]:
                continue
            # Kubernetes expands $(VAR) from the container's env; any pod IP will do here.
            args = [re.sub(r"\$\((\w+)\)", "10.1.2.3", a) for a in container["args"]]
            ctx = parse_cli(args)
            seen.add(ctx.command.name)
            params = ctx.params
            if params.get("store"):
                parse_store_url(params["store"])
            if params.get("discovery_endpoints"):
                parse_endpoints(params["discovery_endpoints"])
            ports = {p["name"] for p in container.get("ports", [])}
            for probe in ("readinessProbe", "livenessProbe"):
                check = container[probe].get("httpGet") or container[probe].get("tcpSocket")
                assert check["port"] in ports, f"{obj['metadata']['name']}: {probe} on an unknown port"
    assert seen == {"serve"}  # discovery serve and teacher serve
    assert len([c for o in all_objects() for c in containers(o) if c.get("command") == ["distill"]]) == 2


def test_student_config_loads(tmp_path):
    (config_map,) = [o for o in objects("student.yaml") if o["kind"] == "ConfigMap"]
    token = tmp_path / "token"
    token.write_text("t0ken\n")
    conf = tmp_path / "reader.conf"
    conf.write_text(config_map["data"]["reader.conf"].replace("/etc/distill/token/token", str(token)))
    config = load_config(conf)
    assert config.mode == "discover" and config.service_name == "mnist" and config.require_num == 2
    compile(config_map["data"]["student.py"], "student.py", "exec")
    (job,) = [o for o in objects("student.yaml") if o["kind"] == "Job"]
    assert containers(job)[0]["command"][-1] == "/etc/distill/student/student.py"


def secret_names(node) -> set[str]:
    """Names of the Secrets a manifest mounts (``secretName``) or reads (``secretKeyRef``)."""
    if isinstance(node, list):
        return set().union(*map(secret_names, node)) if node else set()
    if not isinstance(node, dict):
        return set()
    found = {node["secretName"]} if "secretName" in node else set()
    if "secretKeyRef" in node:
        found.add(node["secretKeyRef"]["name"])
    return found.union(*map(secret_names, node.values()))


def test_docs_name_every_secret_the_manifests_use():
    secrets = secret_names(all_objects())
    doc = (ROOT / "docs" / "kubernetes.md").read_text()
    assert secrets and all(s in doc for s in secrets), secrets

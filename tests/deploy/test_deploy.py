"""The Dockerfile, the compose file and the Kubernetes manifests, checked without a Docker engine or a
cluster: hadolint, yamllint and checkov (each a failure with its own findings), then what serving
adapters on vLLM needs of them, read from the files themselves: runtime LoRA loading, a LoRA rank
room for SaLoRA's 2r exports, one adapter volume at the same path in the gateway and in vLLM, a
gateway config that loads and points at the vLLM replicas, probes, an autoscaler and a GPU."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.settings import Settings, load_settings
from salora.train import TrainOptions
from tests.gateway.conftest import gateway_model_dir  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
CHECKOV = ROOT / ".venv-checkov" / "bin" / "checkov"
YAMLLINT = {"extends": "default", "rules": {"line-length": {"max": 120}, "document-start": "disable",
                                            "truthy": {"check-keys": False}}}


def run(argv: list[str | Path]) -> str:
    done = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{' '.join(map(str, argv))} failed:\n{output}"
    return output


def tool(name: str) -> Path:
    """A linter installed beside this interpreter by the dev extra."""
    path = Path(sys.executable).parent / name
    if not path.is_file():
        pytest.fail(f"{path} is missing: install the dev extra (`pip install -e '.[dev]'`, which `make test` does)")
    return path


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def k8s(kind: str, name: str) -> dict[str, Any]:
    found = [d for f in sorted(K8S.glob("*.yaml")) for d in documents(f)
             if d.get("kind") == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def flags(args: list[str]) -> dict[str, str]:
    """`--name=value` and bare `--name` (value "") arguments of a command line."""
    return {name: value for name, _, value in (a[2:].partition("=") for a in args if a.startswith("--"))}


def gateway_config(text: str, tmp_path: Path, model_dir: Path) -> Settings:
    """A shipped gateway config loaded as `salora serve` would, with a local model directory in place
    of /models/base (which exists only in the containers)."""
    config = tmp_path / "gateway.yaml"
    config.write_text(text)
    return load_settings(config, model=str(model_dir))


def test_hadolint_passes_the_dockerfile() -> None:
    run([tool("hadolint"), "--failure-threshold", "info", ROOT / "Dockerfile"])


def test_yamllint_passes_the_deploy_files() -> None:
    files = [DEPLOY / "compose.yaml", DEPLOY / "gateway.yaml", *sorted(K8S.glob("*.yaml"))]
    run([tool("yamllint"), "--strict", "-d", json.dumps(YAMLLINT), *files])


@pytest.mark.parametrize("framework, target", [("kubernetes", ["-d", K8S]), ("dockerfile", ["-f", ROOT / "Dockerfile"])])
def test_checkov_passes(framework: str, target: list[str | Path]) -> None:
    if not CHECKOV.is_file():
        pytest.fail(f"{CHECKOV} is missing: run `make checkov-venv` (`make test` does)")
    out = run([CHECKOV, *target, "--framework", framework, "--compact", "--skip-download", "-o", "json"])
    report = json.loads(out)
    summary = report["summary"]
    assert summary["failed"] == 0 and summary["passed"] > 50, summary
    for skipped in report["results"].get("skipped_checks", []):  # each skip gives its reason
        assert len(skipped["check_result"].get("suppress_comment", "")) > 20, skipped["check_id"]


def dockerfile_stages() -> dict[str, tuple[str, str]]:
    """Stage name -> (what it is FROM, its text)."""
    text = (ROOT / "Dockerfile").read_text()
    found = re.findall(r"^FROM (\S+) AS (\S+)\n(.*?)(?=^FROM |\Z)", text, re.M | re.S)
    assert len(found) == text.count("\nFROM "), "every stage is named"
    return {name: (base, body) for base, name, body in found}


@pytest.mark.parametrize("target", ["gateway", "gateway-vllm"])
def test_the_dockerfile_is_slim_non_root_and_checks_its_health(target: str) -> None:
    stages = dockerfile_stages()
    assert list(stages)[-1] == "gateway", "the default target is the full gateway"

    def chain(stage: str) -> tuple[str, str]:
        """The Python image a stage starts from, and the text of its stages down to it."""
        base, text = stages[stage]
        while base in stages:
            base, body = stages[base]
            text = body + text
        return base, text

    base, final = chain(target)
    assert re.match(r"python:3\.11-slim", base)
    assert re.search(r"^USER 10001", final, re.M) and "/healthz" in final and "HEALTHCHECK" in final
    assert re.search(r'^ENTRYPOINT \["salora", "serve"\]', final, re.M)
    (venv,) = re.findall(r"^COPY --from=(\S+) /opt/venv /opt/venv$", final, re.M)
    installs = " ".join(re.findall(r"^RUN .*(?:\n .*)*", chain(venv)[1], re.M))
    assert ("torch==" in installs) == (target == "gateway")  # gateway-vllm's venv has no torch
    ignored = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and line[0] != "#"]
    assert ignored[0] == "*" and {"!salora/", "!gateway/", "!salora_cli/", "!pyproject.toml"} <= set(ignored)


def test_compose_serves_adapters_from_vllm(tmp_path: Path, gateway_model_dir: Path) -> None:
    compose = documents(DEPLOY / "compose.yaml")[0]
    services = compose["services"]
    assert {"vllm", "salora-gateway", "prometheus", "grafana"} <= set(services)
    vllm, gateway = services["vllm"], services["salora-gateway"]
    settings = gateway_config((DEPLOY / "gateway.yaml").read_text(), tmp_path, gateway_model_dir)
    assert settings.engine == "vllm" and settings.vllm is not None

    assert vllm["image"].startswith("vllm/vllm-openai:")
    args = flags(vllm["command"])
    assert "enable-lora" in args and vllm["environment"]["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert int(args["max-lora-rank"]) >= max(settings.lifecycle.max_rank, 2 * TrainOptions.rank)
    assert int(args["max-loras"]) == settings.vllm.max_loras
    assert settings.vllm.urls == [f"http://vllm:{args['port']}"]
    assert vllm["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]

    # one volume, at the gateway's adapter_dir in both, as vLLM sees it where the gateway writes
    assert settings.vllm.upstream_adapter_dir is None
    adapter_dir = str(settings.vllm.adapter_dir)
    mounts = {name: {v.split(":")[1]: v.split(":")[0] for v in s["volumes"]} for name, s in services.items()
              if name in ("vllm", "salora-gateway")}
    assert mounts["vllm"][adapter_dir] == mounts["salora-gateway"][adapter_dir] == "adapters"
    assert "adapters" in compose["volumes"]
    assert gateway["volumes"].count("./gateway.yaml:/etc/salora/gateway.yaml:ro") == 1
    assert gateway["environment"]["SALORA_CONFIG"] == "/etc/salora/gateway.yaml"
    assert gateway["depends_on"]["vllm"]["condition"] == "service_healthy"
    # replicas share the compose file's PostgreSQL and Redis, started before the gateway
    assert gateway["environment"]["SALORA_DB_URL"].startswith("postgresql://salora:")
    assert gateway["environment"]["SALORA_REDIS_URL"] == "redis://redis:6379/0"
    for service in ("postgres", "redis"):
        assert gateway["depends_on"][service]["condition"] == "service_healthy" and "healthcheck" in services[service]

    scraped = documents(DEPLOY / "prometheus" / "prometheus.yml")[0]["scrape_configs"][0]["static_configs"][0]["targets"]
    assert scraped == ["salora-gateway:8000"]
    for mount in (*services["prometheus"]["volumes"], *services["grafana"]["volumes"]):
        source = mount.split(":")[0]
        assert not source.startswith(".") or (DEPLOY / source).is_dir(), mount


def test_kubernetes_gateway_and_vllm(tmp_path: Path, gateway_model_dir: Path) -> None:
    config = k8s("ConfigMap", "salora-gateway")["data"]["gateway.yaml"]
    settings = gateway_config(config, tmp_path, gateway_model_dir)
    assert settings.engine == "vllm" and settings.vllm is not None
    vllm = k8s("StatefulSet", "vllm")
    service = k8s("Service", "vllm")
    assert service["spec"]["clusterIP"] == "None" and vllm["spec"]["serviceName"] == "vllm"
    (container,) = vllm["spec"]["template"]["spec"]["containers"]
    args = flags(container["args"])
    assert settings.vllm.urls == [f"http://vllm-{i}.vllm:{args['port']}" for i in range(vllm["spec"]["replicas"])]
    assert "enable-lora" in args and int(args["max-lora-rank"]) >= settings.lifecycle.max_rank
    assert int(args["max-loras"]) == settings.vllm.max_loras
    assert {"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "True"} in container["env"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"

    gateway = k8s("Deployment", "salora-gateway")
    (gw,) = gateway["spec"]["template"]["spec"]["containers"]
    assert gw["readinessProbe"]["httpGet"]["path"] == "/readyz" and gw["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert gateway["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    hpa = k8s("HorizontalPodAutoscaler", "salora-gateway")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "salora-gateway"}
    assert hpa["spec"]["minReplicas"] >= 2
    # several replicas only on one database and one Redis, both required (no `optional`): never N worlds
    env = {e["name"]: e for e in gw["env"]}
    for name, key in (("SALORA_DB_URL", "db-url"), ("SALORA_REDIS_URL", "redis-url")):
        assert env[name]["valueFrom"]["secretKeyRef"] == {"name": "salora-gateway", "key": key}

    # the adapter volume: ReadWriteMany, at adapter_dir in the gateway and in every vLLM pod
    claim = k8s("PersistentVolumeClaim", "salora-adapters")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    for pod, c in ((gateway, gw), (vllm, container)):
        volumes = {v["name"]: v for v in pod["spec"]["template"]["spec"]["volumes"]}
        (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == str(settings.vllm.adapter_dir)]
        assert volumes[mount["name"]]["persistentVolumeClaim"]["claimName"] == "salora-adapters"
    assert settings.state_dir.is_relative_to(settings.vllm.adapter_dir)  # uploads land where vLLM reads

    resources = documents(K8S / "kustomization.yaml")[0]["resources"]
    assert sorted(resources) == sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def test_yamllint_would_catch_a_broken_file(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("services:\n  vllm:\n    image: a\n    image: b\n")
    done = subprocess.run([str(tool("yamllint")), "-d", json.dumps(YAMLLINT), str(broken)], capture_output=True, text=True)
    assert done.returncode == 1 and "duplication of key" in done.stdout


def test_hadolint_would_catch_a_root_image(tmp_path: Path) -> None:
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text("FROM python:latest\nRUN pip install flask\n")
    done = subprocess.run([str(tool("hadolint")), str(dockerfile)], capture_output=True, text=True)
    assert done.returncode == 1 and "DL3007" in done.stdout and "DL3013" in done.stdout

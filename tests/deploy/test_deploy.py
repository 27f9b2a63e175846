"""The deployment files: every Kubernetes manifest valid against the API schemas (offline, with
kubernetes-validate, strict), every ocicache config they embed loaded by ocicache's own loader,
and the ports, probe paths, mounts and the Docker and systemd files agreeing with what the
server serves. The Grafana dashboard reads only series /metrics has."""

from __future__ import annotations

import asyncio
import configparser
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import kubernetes_validate
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from proxy.core.config import Settings, load
from proxy.web.app import create_app
from tests.conftest import StartProxy
from tests.support.fake_upstream import FakeUpstream
from tests.support.images import MANIFEST_ACCEPT, make_image

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
MANIFESTS = sorted((DEPLOY / "kubernetes").rglob("*.yaml"))
# The oldest and the newest Kubernetes the schemas cover that clusters still run.
VERSIONS = ("1.27.0", kubernetes_validate.latest_version())
PROBES = {"livenessProbe": "/healthz", "readinessProbe": "/readyz", "startupProbe": "/healthz"}


def documents() -> list[tuple[Path, dict[str, Any]]]:
    docs = []
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((path, doc))
    return docs


def ident(item: tuple[Path, dict[str, Any]]) -> str:
    path, doc = item
    return f"{path.relative_to(DEPLOY)}:{doc['kind']}/{doc['metadata']['name']}"


DOCS = documents()


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in DOCS if doc["kind"] == kind]


def configmap(name: str) -> dict[str, Any]:
    [found] = [d for d in of_kind("ConfigMap") if d["metadata"]["name"] == name]
    return found


# What the manifests put in the environment from Secrets, for the loader (never a real one).
SECRET_ENV = {"OCICACHE_CLUSTER_TOKEN": "x" * 32}


@pytest.fixture(autouse=True)
def _secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    # Some parsers read the process environment itself (cluster.token_env, auth.tokens_env).
    for name, value in SECRET_ENV.items():
        monkeypatch.setenv(name, value)


def embedded_settings(name: str, tmp_path: Path) -> Settings:
    path = tmp_path / f"{name}.yaml"
    path.write_text(configmap(name)["data"]["config.yaml"])
    return load(path, {}, SECRET_ENV)


def workloads() -> list[dict[str, Any]]:
    return of_kind("DaemonSet") + of_kind("Deployment") + of_kind("StatefulSet")


def ocicache_containers() -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(workload, container) for every container that runs ``ocicache serve``."""
    return [
        (w, c)
        for w in workloads()
        for c in w["spec"]["template"]["spec"]["containers"]
        if c.get("args", [])[:1] == ["serve"]
    ]


def test_there_are_manifests() -> None:
    kinds = {(p.parent.name, d["kind"]) for p, d in DOCS}
    assert {("node-local", "DaemonSet"), ("node-local", "ConfigMap")} <= kinds
    assert {("cluster", k) for k in ("Deployment", "Service", "PersistentVolumeClaim", "ConfigMap")} <= kinds


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("item", DOCS, ids=[ident(d) for d in DOCS])
def test_every_manifest_is_valid(item: tuple[Path, dict[str, Any]], version: str) -> None:
    kubernetes_validate.validate(item[1], version, strict=True)


def test_every_embedded_config_loads(tmp_path: Path) -> None:
    names = [d["metadata"]["name"] for d in of_kind("ConfigMap") if "config.yaml" in d.get("data", {})]
    assert {"ocicache-cluster", "ocicache-node"} <= set(names)
    for name in names:
        settings = embedded_settings(name, tmp_path)
        assert settings.cache_dir == Path("/cache")
        assert settings.log_format == "json"
    systemd = tmp_path / "systemd.yaml"
    shutil.copy(DEPLOY / "systemd" / "config.yaml", systemd)
    assert load(systemd, {}, {}).cache_dir == Path("/var/cache/ocicache")


def test_ports_probes_and_mounts_match_the_server(tmp_path: Path) -> None:
    found = ocicache_containers()
    assert {w["kind"] for w, _ in found} >= {"DaemonSet", "Deployment"}
    for workload, container in found:
        spec = workload["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        claims = {t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])}
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        # The config the container is told to read is the ConfigMap, mounted there.
        config_path = Path(container["args"][container["args"].index("--config") + 1])
        config_volume = next(n for n, p in mounts.items() if Path(p) == config_path.parent)
        settings = embedded_settings(volumes[config_volume]["configMap"]["name"], tmp_path)
        assert Path(mounts["cache"]) == settings.cache_dir
        [port] = container["ports"]
        assert port["name"] == "http" and port["containerPort"] == settings.listen_port
        if workload["kind"] == "DaemonSet":
            assert port["hostPort"] == settings.listen_port
            assert "hostPath" in volumes["cache"]
        elif workload["kind"] == "StatefulSet":
            assert "cache" in claims  # one disk per replica
        else:
            assert "persistentVolumeClaim" in volumes["cache"]
            # A cache directory has one writer: one replica, never two at once.
            assert workload["spec"]["replicas"] == 1 and workload["spec"]["strategy"]["type"] == "Recreate"
        routes = {r.canonical for r in create_app(settings).router.resources()}
        for probe, path in PROBES.items():
            get = container[probe]["httpGet"]
            assert get["path"] == path and get["port"] in ("http", settings.listen_port)
            assert path in routes
        assert container["resources"]["limits"]["memory"]
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] and not security["allowPrivilegeEscalation"]
        assert spec["securityContext"]["runAsNonRoot"] is True
    # Every Service selects a workload, and targets ports its containers have.
    for service in of_kind("Service"):
        selector = service["spec"]["selector"].items()
        [target] = [w for w in workloads() if selector <= w["spec"]["template"]["metadata"]["labels"].items()]
        ports = {
            key
            for c in target["spec"]["template"]["spec"]["containers"]
            for p in c.get("ports", [])
            for key in (p.get("name"), p["containerPort"])
        }
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, service["metadata"]["name"]


def test_the_containerd_hosts_writer_asks_the_node_cache_for_configured_registries(tmp_path: Path) -> None:
    [writer] = [d for d in of_kind("DaemonSet") if d["metadata"]["name"] == "ocicache-containerd-hosts"]
    [init] = writer["spec"]["template"]["spec"]["initContainers"]
    env = {e["name"]: e.get("value") for e in init["env"]}
    node = embedded_settings("ocicache-node", tmp_path)
    assert env["OCICACHE_URL"] == f"http://$(NODE_IP):{node.listen_port}"
    names = {u.name for u in node.upstreams} | {"_default"}
    assert set(env["REGISTRIES"].split()) <= names
    script = configmap("ocicache-containerd-hosts")["data"]["write-hosts.py"]
    compile(script, "write-hosts.py", "exec")
    assert '"/setup/containerd?"' in script and '"/readyz"' in script
    routes = {r.canonical for r in create_app(node).router.resources()}
    assert {"/setup/{client}", "/readyz"} <= routes


async def test_the_containerd_hosts_writer_against_a_real_proxy(
    start_proxy: StartProxy, fake: FakeUpstream, tmp_path: Path
) -> None:
    proxy = await start_proxy({"docker.io": fake.url, "ghcr.io": fake.url})
    script = tmp_path / "write-hosts.py"
    script.write_text(configmap("ocicache-containerd-hosts")["data"]["write-hosts.py"])
    certs = tmp_path / "certs.d"
    env = {"OCICACHE_URL": proxy.url, "CERTS_DIR": str(certs), "REGISTRIES": "docker.io ghcr.io _default"}
    proc = await asyncio.create_subprocess_exec(sys.executable, str(script), env=env)
    assert await proc.wait() == 0
    async with aiohttp.ClientSession() as session:
        for name in ("docker.io", "ghcr.io", "_default"):
            async with session.get(f"{proxy.url}/setup/containerd", params={"registry": name}) as resp:
                assert (certs / name / "hosts.toml").read_text() == await resp.text()
    assert not list(certs.rglob(".hosts.toml.*"))


def test_dockerfile() -> None:
    text = (ROOT / "Dockerfile").read_text()
    default = Settings()
    health = re.search(r"^HEALTHCHECK .*?CMD (.*?)$", text, re.M | re.S)
    assert health is not None and f"127.0.0.1:{default.listen_port}/healthz" in text
    assert re.search(rf"^EXPOSE {default.listen_port}$", text, re.M)
    user = re.search(r"^USER (\S+)$", text, re.M)
    assert user is not None and user.group(1).split(":")[0] not in ("root", "0")
    assert re.search(r"^VOLUME /cache$", text, re.M) and "OCICACHE_CACHE_DIR=/cache" in text
    assert "OCICACHE_LISTEN" not in text  # the environment would win over a mounted config
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    ignored = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert {".git", ".venv", "tests"} <= set(ignored)
    for copied in re.findall(r"^COPY (.+) \S+$", text, re.M):
        for name in shlex.split(copied):
            assert name not in ignored and (ROOT / name).exists()
    # The image's user is the one the manifests run as.
    uid = user.group(1).split(":")[0]
    for workload, _ in ocicache_containers():
        assert str(workload["spec"]["template"]["spec"]["securityContext"]["runAsUser"]) == uid


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(DEPLOY / "systemd" / "ocicache.service")
    return parser


def test_systemd_unit_sandboxing_and_paths(tmp_path: Path) -> None:
    service = unit()["Service"]
    for key, value in {
        "DynamicUser": "yes",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "RestrictNamespaces": "yes",
        "MemoryDenyWriteExecute": "yes",
        "CapabilityBoundingSet": "",
        "CacheDirectory": "ocicache",
        "ConfigurationDirectory": "ocicache",
    }.items():
        assert service[key] == value, key
    argv = shlex.split(service["ExecStart"])
    assert argv[1:3] == ["serve", "--config"] and argv[3] == "/etc/ocicache/config.yaml"
    systemd = tmp_path / "config.yaml"
    shutil.copy(DEPLOY / "systemd" / "config.yaml", systemd)
    assert load(systemd, {}, {}).cache_dir == Path("/var/cache") / service["CacheDirectory"]


def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    # verify checks the binary exists: point it at this environment's ocicache. The security
    # threshold is in tenths: the overall exposure must stay at 2.0 ("OK") or below.
    text = (DEPLOY / "systemd" / "ocicache.service").read_text()
    here = Path(sys.executable).parent / "ocicache"
    assert here.exists()
    copy = tmp_path / "ocicache.service"
    copy.write_text(text.replace("/usr/local/bin/ocicache", str(here)))
    verify = subprocess.run(
        ["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60
    )
    assert verify.returncode == 0 and verify.stderr == "", verify.stderr
    security = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--threshold=20", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert security.returncode == 0, security.stdout[-2000:]


async def test_the_grafana_dashboard_reads_only_series_that_exist(
    start_proxy: StartProxy, fake: FakeUpstream
) -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "ocicache.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert exprs
    image = make_image()
    fake.add_image("library/app", image, tag="v1")
    fake.ratelimit_remaining = 99
    proxy = await start_proxy({"docker.io": fake.url})
    async with aiohttp.ClientSession() as session:
        async with session.get(
            f"{proxy.url}/v2/library/app/manifests/v1", headers={"Accept": MANIFEST_ACCEPT}
        ):
            pass
        async with session.get(f"{proxy.url}/metrics") as resp:
            text = await resp.text()
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names |= {s.name for s in family.samples}
        if family.type == "counter":
            names.add(family.name + "_total")
        if family.type == "histogram":
            names |= {family.name + suffix for suffix in ("_bucket", "_count", "_sum")}
    used = {m for e in exprs for m in re.findall(r"\b((?:ocicache|process)_[a-z_]+)\b", e)}
    assert used - names == set()
    assert {
        "ocicache_evictions_total",
        "ocicache_cache_budget_bytes",
        "ocicache_upstream_request_seconds_bucket",
        "ocicache_upstream_errors_total",
        "ocicache_prefetch_jobs",
        "process_resident_memory_bytes",
    } <= used

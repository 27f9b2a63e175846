"""deploy/kubernetes/replicated: the replicated cache's manifests agree with each other and with
ocicache (its config loads through ocicache's own loader, its args through the CLI's parser,
its probes name routes the app serves)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from yarl import URL

from proxy.cli.main import parser
from proxy.core.config import load

ROOT = Path(__file__).resolve().parents[2]
HERE = ROOT / "deploy" / "kubernetes" / "replicated"


def docs() -> list[dict[str, Any]]:
    found = []
    for path in sorted(HERE.glob("*.yaml")):
        found += [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return found


def one(kind: str, name: str) -> dict[str, Any]:
    [found] = [d for d in docs() if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def test_the_replicas_config_loads_and_names_the_redis_service(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sts = one("StatefulSet", "ocicache-replica")
    [container] = sts["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["OCICACHE_CLUSTER_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "ocicache-cluster-token"
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    monkeypatch.setenv("OCICACHE_CLUSTER_TOKEN", "t" * 32)
    args = [a.replace("$(POD_IP)", "10.0.0.7") for a in container["args"]]
    ns = parser().parse_args(args)
    config = tmp_path / "config.yaml"
    config.write_text(one("ConfigMap", "ocicache-replicated")["data"]["config.yaml"])
    settings = load(config, {"cluster.advertise": ns.advertise}, {})
    assert settings.cluster.enabled and settings.cluster.advertise == "http://10.0.0.7:5000"
    assert settings.cluster.token_env == "OCICACHE_CLUSTER_TOKEN"
    redis_host = URL(settings.cluster.redis or "").host or ""
    assert redis_host.split(".")[0] == one("Service", "ocicache-redis")["metadata"]["name"]
    assert str(settings.cache_dir) == next(
        m["mountPath"] for m in container["volumeMounts"] if m["name"] == "cache"
    )


def test_services_pdb_and_probes_fit_the_replicas() -> None:
    sts = one("StatefulSet", "ocicache-replica")
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert sts["spec"]["selector"]["matchLabels"] == labels
    assert sts["spec"]["replicas"] >= 3
    peers = one("Service", sts["spec"]["serviceName"])
    assert peers["spec"]["clusterIP"] == "None"  # headless: per-pod addresses
    for service in (peers, one("Service", "ocicache-replicated")):
        assert service["spec"]["selector"] == labels
        assert service["spec"]["ports"][0]["targetPort"] == "http"
    assert one("PodDisruptionBudget", "ocicache-replica")["spec"]["selector"]["matchLabels"] == labels
    [container] = sts["spec"]["template"]["spec"]["containers"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["ports"][0] == {"name": "http", "containerPort": 5000, "protocol": "TCP"}
    policy = one("NetworkPolicy", "ocicache-redis")
    assert policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"] == labels

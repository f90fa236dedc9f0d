"""What can be checked of the deployment without a Docker engine: files, configs, queries, live metrics."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import yaml

from app.fleet.config import load_backends_file
from testkit.gateway import RunningGateway, chat_body, wait_until
from testkit.redis_server import RedisServer

ROOT = Path(__file__).resolve().parents[2]
StartGateway = Callable[..., RunningGateway]


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("REQUIRE_PROMTOOL"):
            pytest.fail("promtool is required here (Debian package 'prometheus'); make test installs it")
        pytest.skip("promtool not installed (apt-get install prometheus); make test installs it")
    return path


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def test_compose_file_parses_and_references_files_that_exist() -> None:
    services = compose()["services"]
    assert {"gateway", "prometheus", "grafana", "llama-server", "gateway-proxy"} <= set(services)
    for name, service in services.items():
        build = service.get("build")
        if build is not None:
            assert (ROOT / build["context"] / "Dockerfile").is_file(), name
        for env_file in service.get("env_file", []):
            # queue-config.env is the operator's copy of the example, which must exist to be copied.
            assert not env_file["required"] and (ROOT / (env_file["path"] + ".example")).is_file()
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./") and source != "./models":  # ./models holds the operator's GGUF
                assert (ROOT / source).exists(), f"{name}: {source}"
    gateway = services["gateway"]
    assert gateway["restart"] == "unless-stopped" and "/health" in " ".join(gateway["healthcheck"]["test"])
    assert services["gateway-proxy"]["profiles"] == ["proxy"] == services["llama-server"]["profiles"]
    assert services["gateway-proxy"]["environment"]["UPSTREAM_BASE_URL"] == "http://llama-server:8080/v1"
    fleet = services["gateway-fleet"]
    assert (
        fleet["profiles"]
        == ["fleet"]
        == services["llama-server-1"]["profiles"]
        == services["llama-server-2"]["profiles"]
    )
    assert "./deploy/fleet/backends.yaml:/config/backends.yaml:ro" in fleet["volumes"]
    config = load_backends_file(str(ROOT / "deploy/fleet/backends.yaml"))
    assert [urlsplit(b.base_url).hostname for b in config.backends if b.type == "proxy"] == [
        "llama-server-1",
        "llama-server-2",
    ]
    assert fleet["environment"]["BACKENDS_FILE"] == "/config/backends.yaml"
    # Replicas: two gateways on one Redis and one llama-server, behind an official load balancer's image.
    replicas = [services["gateway-replica-1"], services["gateway-replica-2"]]
    assert [r["environment"]["REPLICA_ID"] for r in replicas] == ["replica-1", "replica-2"]
    assert {r["environment"]["REDIS_URL"] for r in replicas} == {"redis://redis:6379/0"}
    assert services["redis"]["image"].startswith("redis:") and services["load-balancer"]["image"].startswith("nginx:")
    assert all(
        services[name]["profiles"] == ["replicas"]
        for name in ("redis", "load-balancer", *("gateway-replica-1", "gateway-replica-2", "llama-server-replicas"))
    )
    nginx = (ROOT / "deploy/replicas/nginx.conf").read_text()
    assert "gateway-replica-1:8091" in nginx and "gateway-replica-2:8091" in nginx


def test_dockerfile_is_multi_stage_non_root_with_a_healthcheck() -> None:
    text = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM \S+ AS (\w+)", text, re.MULTILINE)
    assert stages == ["builder", "runtime"]
    runtime = text.split("AS runtime", 1)[1]
    assert re.search(r"^USER gateway$", runtime, re.MULTILINE) and "useradd" in runtime
    assert "HEALTHCHECK" in runtime and "/health" in runtime
    assert re.search(r"^EXPOSE 8091$", runtime, re.MULTILINE)
    assert 'CMD ["llm-queue-gateway", "serve"]' in runtime
    assert "ARG CMAKE_ARGS" in text  # the CUDA build passes -DGGML_CUDA=on


def test_dockerfile_builds_dependencies_in_a_layer_of_their_own_for_any_cpu() -> None:
    text = (ROOT / "Dockerfile").read_text()
    builder, runtime = text.split("AS runtime", 1)
    # pyproject.toml alone, then the dependencies (llama.cpp's compile), and only then the code.
    assert builder.index("COPY pyproject.toml ./") < builder.index("pip install -r") < builder.index("COPY app")
    assert "pip install --no-deps ." in builder
    extract = re.search(r'python -c "(import tomllib.*?)"\s*\\\n\s*> /tmp/requirements.txt', builder, re.DOTALL)
    assert extract is not None
    listed = subprocess.run(
        [sys.executable, "-c", extract.group(1)], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    assert listed == tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert 'CMAKE_ARGS="-DGGML_NATIVE=OFF ${CMAKE_ARGS}"' in builder  # portable, not the build machine's CPU
    assert "CMAKE_CUDA_ARCHITECTURES" in text  # the documented CUDA build works without a GPU at build time
    # The python images have their Python: the distribution's is installed only where none is.
    assert re.search(r"if command -v python3 >/dev/null; then python=\"\"", runtime)
    assert not re.search(r"install -y[^\n]*\bpython3\b", runtime)


def test_prometheus_config_passes_promtool() -> None:
    result = subprocess.run(
        [promtool(), "check", "config", str(ROOT / "deploy/prometheus/prometheus.yml")],
        check=False,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    jobs = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())["scrape_configs"]
    assert "gateway:8091" in jobs[0]["static_configs"][0]["targets"]
    # The proxy gateway runs only with its profile: found by DNS, so it is no target that is down for good.
    assert "static_configs" not in jobs[1] and jobs[1]["dns_sd_configs"][0]["names"] == ["gateway-proxy"]
    assert jobs[2]["dns_sd_configs"][0]["names"] == ["gateway-fleet"]
    # No target label may take a name the gateway's own series carry: Prometheus would rename the series' one.
    target_labels = {rule["target_label"] for job in jobs for rule in job.get("relabel_configs", [])}
    target_labels |= {name for job in jobs for config in job.get("static_configs", []) for name in config["labels"]}
    assert not target_labels & {"backend", "model", "priority", "outcome", "reason", "kind"}


@pytest.fixture
def live_metrics(start_gateway: StartGateway, tmp_path: Path) -> Iterator[str]:
    """/metrics of a replica (sharing a real Redis) that has served, refused and rate-limited some requests,
    so every family has samples, the shared queue's included."""
    if not RedisServer.available():
        pytest.fail("redis-server is not installed (Debian: apt-get install redis-server; make test installs it)")
    redis = RedisServer().start()
    try:
        keys = tmp_path / "keys.yaml"
        keys.write_text("keys:\n  - {key: sk-a, name: a, rpm: 1}\n")
        gw = start_gateway(
            api_keys_file=str(keys), rate_limit_rpm=100, rate_limit_tpm=100_000, redis_url=redis.url, lease_ttl=1
        )
        headers = {"Authorization": "Bearer sk-a"}
        assert httpx.post(gw.url + "/v1/chat/completions", json=chat_body(), headers=headers).status_code == 200
        assert httpx.post(gw.url + "/v1/chat/completions", json=chat_body(), headers=headers).status_code == 429
        assert wait_until(lambda: "gateway_replicas{" in httpx.get(gw.url + "/metrics").text)  # a heartbeat saw it
        yield httpx.get(gw.url + "/metrics").text
    finally:
        redis.stop()


def test_live_metrics_pass_promtool(live_metrics: str) -> None:
    result = subprocess.run(
        [promtool(), "check", "metrics"], input=live_metrics, check=False, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_loads_and_queries_only_exported_metrics(live_metrics: str) -> None:
    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/llm-queue-gateway.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    titles = " ".join(panel["title"] for panel in dashboard["panels"]).lower()
    for wanted in ("queue depth", "wait", "in flight", "outcomes", "tokens per second"):
        assert wanted in titles
    text = live_metrics
    families = set(re.findall(r"^# TYPE (\w+) ", text, re.MULTILINE))
    samples = set(re.findall(r"^(\w+)[{ ]", text, re.MULTILINE))
    used = {name for expr in exprs for name in re.findall(r"\bgateway_\w+", expr)}
    assert len(used) >= 10
    for name in used:
        family = re.sub(r"_(bucket|sum|count|total)$", "", name)
        assert name in samples or (name.endswith("_bucket") and family in families), f"{name} is not exported"
    provisioning = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    assert provisioning["datasources"][0]["uid"] == dashboard["panels"][0]["datasource"]["uid"]
    dashboards = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/gateway.yml").read_text())
    mounted = compose()["services"]["grafana"]["volumes"]
    assert f"./deploy/grafana/dashboards:{dashboards['providers'][0]['options']['path']}:ro" in mounted

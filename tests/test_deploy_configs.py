"""Structural checks of the deployment files that CI cannot run (no Docker engine, no cluster, no
collector, no Grafana): deploy/compose.yaml, the collector and Tempo configs, deploy/k8s/.

What runs for real (Prometheus and Alertmanager through deploy/local/run.sh, promtool on the
shipped prometheus.yml) is in tests/integration/test_deploy_local.py.
"""

from __future__ import annotations

import importlib.util
import re
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
COLLECTOR = DEPLOY / "otel-collector" / "config.yaml"
TEMPO = DEPLOY / "tempo" / "tempo.yaml"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
RULES_DIR = DEPLOY / "prometheus" / "rules"
K8S = DEPLOY / "k8s"

K8S_KINDS = {
    "podmonitor.yaml": {("monitoring.coreos.com/v1", "PodMonitor")},
    "prometheusrule.yaml": {("monitoring.coreos.com/v1", "PrometheusRule")},
    "collector-agent.yaml": {("v1", "ConfigMap"), ("apps/v1", "DaemonSet")},
    "collector-gateway.yaml": {("v1", "ConfigMap"), ("apps/v1", "Deployment"), ("v1", "Service")},
    "training-job-example.yaml": {("v1", "Service"), ("batch/v1", "Job")},
}


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]


def _compose() -> dict[str, Any]:
    return _load(COMPOSE)


def _by_kind(path: Path, kind: str) -> dict[str, Any]:
    (doc,) = [d for d in _docs(path) if d["kind"] == kind]
    return doc


def _pinned(image: str) -> bool:
    """``name:tag`` with a tag other than latest (a registry port's ':' is not a tag)."""
    name, _, tag = image.rpartition(":")
    return bool(name) and "/" not in tag and tag not in ("", "latest")


# --- compose -------------------------------------------------------------------------------------


def test_compose_parses_with_the_stack_services():
    services = _compose()["services"]
    assert {"otel-collector", "prometheus", "alertmanager", "grafana", "tempo"} <= set(services)


def test_compose_images_are_pinned():
    for name, service in _compose()["services"].items():
        image = service["image"]
        assert _pinned(image), f"{name}: image {image!r} has no pinned tag"


def test_compose_ports_are_loopback_only():
    published = 0
    for name, service in _compose()["services"].items():
        assert service.get("network_mode") != "host", f"{name} uses the host network"
        for port in service.get("ports", []):
            published += 1
            if isinstance(port, dict):  # long syntax
                assert port.get("host_ip") == "127.0.0.1", f"{name}: {port}"
            else:
                parts = str(port).split(":")
                assert len(parts) == 3 and parts[0] == "127.0.0.1", f"{name}: {port!r} not bound to 127.0.0.1"
    assert published >= 5


def _bind_mounts() -> list[tuple[str, str, str]]:
    """(service, host path, container path) of every bind mount; named volumes are skipped."""
    mounts = []
    for name, service in _compose()["services"].items():
        for volume in service.get("volumes", []):
            if isinstance(volume, dict):
                if volume.get("type") == "bind":
                    mounts.append((name, volume["source"], volume["target"]))
                continue
            source, target = volume.split(":")[:2]
            if source.startswith((".", "/", "~")):
                mounts.append((name, source, target))
    return mounts


def test_compose_bind_mounts_exist_in_the_repo():
    mounts = _bind_mounts()
    assert len(mounts) >= 8
    for service, source, _ in mounts:
        assert not source.startswith(("/", "~")), f"{service}: absolute host path {source}"
        path = (DEPLOY / source).resolve()
        assert path.is_relative_to(REPO), f"{service}: {source} leaves the repository"
        assert path.exists(), f"{service}: {source} (relative to deploy/) does not exist"


def test_compose_named_volumes_are_declared():
    declared = set(_compose().get("volumes") or {})
    for name, service in _compose()["services"].items():
        for volume in service.get("volumes", []):
            if isinstance(volume, str) and not volume.startswith((".", "/", "~")):
                assert volume.split(":")[0] in declared, f"{name}: undeclared volume {volume}"


def test_compose_mounts_what_the_configs_expect():
    mounts = {(service, target): source for service, source, target in _bind_mounts()}
    assert mounts[("prometheus", "/etc/prometheus/prometheus.yml")] == "./prometheus/prometheus.yml"
    assert mounts[("prometheus", "/etc/prometheus/rules")] == "./prometheus/rules"
    assert mounts[("prometheus", "/etc/prometheus/targets")] == "./targets"
    assert mounts[("alertmanager", "/etc/alertmanager/alertmanager.yml")] == "./alertmanager/alertmanager.yml"
    assert mounts[("otel-collector", "/etc/otelcol-contrib/config.yaml")] == "./otel-collector/config.yaml"
    assert mounts[("tempo", "/etc/tempo/tempo.yaml")] == "./tempo/tempo.yaml"
    for kind in ("datasources", "dashboards"):
        source = mounts[("grafana", f"/etc/grafana/provisioning/{kind}")]
        assert source == f"../grafana/provisioning/{kind}"
    # the Grafana dashboards file provider reads /var/lib/grafana/dashboards/otel-ml
    assert mounts[("grafana", "/var/lib/grafana/dashboards/otel-ml")] == "../grafana/dashboards"
    provider = _load(REPO / "grafana" / "provisioning" / "dashboards" / "otel-ml.yaml")
    assert [p["options"]["path"] for p in provider["providers"]] == ["/var/lib/grafana/dashboards/otel-ml"]
    assert list((REPO / "grafana" / "dashboards").glob("*.json"))
    services = _compose()["services"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]
    assert "-config.file=/etc/tempo/tempo.yaml" in services["tempo"]["command"]


def test_grafana_datasources_point_at_compose_services():
    """grafana/provisioning/datasources uses the compose service names and their ports."""
    services = _compose()["services"]
    datasources = _load(REPO / "grafana" / "provisioning" / "datasources" / "otel-ml.yaml")["datasources"]
    urls = {d["uid"]: urllib.parse.urlsplit(d["url"]) for d in datasources if "url" in d}
    assert {"prometheus", "tempo"} <= set(urls)
    for uid, url in urls.items():
        assert url.hostname in services, f"datasource {uid}: {url.hostname} is no compose service"
        container_ports = {int(str(p).split(":")[-1]) for p in services[url.hostname].get("ports", [])}
        assert url.port in container_ports, f"datasource {uid}: port {url.port} not served by {url.hostname}"


def test_compose_prometheus_reaches_the_host():
    hosts = _compose()["services"]["prometheus"]["extra_hosts"]
    assert "host.docker.internal:host-gateway" in hosts


def test_prometheus_config_addresses_match_compose():
    """The shipped prometheus.yml talks to the compose services by name and port."""
    config = _load(PROMETHEUS)
    services = _compose()["services"]
    (am_target,) = config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    assert am_target == "alertmanager:9093" and "alertmanager" in services
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["otel_ml"]["honor_labels"] is True
    assert jobs["otel_ml"]["file_sd_configs"][0]["files"] == ["/etc/prometheus/targets/*.json"]
    assert jobs["otel_ml_collector"]["honor_labels"] is True
    (collector_target,) = jobs["otel_ml_collector"]["static_configs"][0]["targets"]
    host, port = collector_target.split(":")
    assert host == "otel-collector" and host in services
    assert _load(COLLECTOR)["exporters"]["prometheus"]["endpoint"] == f"0.0.0.0:{port}"
    assert config["rule_files"] == ["rules/*.yaml"]  # relative to the config: deploy/prometheus/rules


# --- OpenTelemetry Collector configs ---------------------------------------------------------------


def _collector_configs() -> dict[str, dict[str, Any]]:
    configs = {"deploy/otel-collector/config.yaml": _load(COLLECTOR)}
    for name in ("collector-agent.yaml", "collector-gateway.yaml"):
        config_map = _by_kind(K8S / name, "ConfigMap")
        configs[f"deploy/k8s/{name}"] = yaml.safe_load(config_map["data"]["config.yaml"])
    return configs


@pytest.mark.parametrize("name", list(_collector_configs()))
def test_collector_pipelines_reference_defined_components(name):
    config = _collector_configs()[name]
    pipelines = config["service"]["pipelines"]
    assert {"metrics", "traces"} <= set(pipelines)
    for pipeline_name, pipeline in pipelines.items():
        for kind in ("receivers", "processors", "exporters"):
            assert pipeline.get(kind), f"{name} {pipeline_name}: no {kind}"
            for component in pipeline[kind]:
                assert component in (config.get(kind) or {}), f"{name} {pipeline_name}: {component} undefined"
        processors = pipeline["processors"]
        assert processors[0] == "memory_limiter", f"{name} {pipeline_name}: memory_limiter must come first"
        assert "batch" in processors
    for extension in config["service"].get("extensions", []):
        assert extension in config["extensions"]


@pytest.mark.parametrize("name", list(_collector_configs()))
def test_collector_listens_beyond_localhost(name):
    """The collector's default endpoint is localhost, unreachable from outside its container."""
    protocols = _collector_configs()[name]["receivers"]["otlp"]["protocols"]
    assert protocols["grpc"]["endpoint"] == "0.0.0.0:4317"
    assert protocols["http"]["endpoint"] == "0.0.0.0:4318"


@pytest.mark.parametrize("name", ["deploy/otel-collector/config.yaml", "deploy/k8s/collector-gateway.yaml"])
def test_collector_keeps_otel_ml_names(name):
    """Where OTLP becomes Prometheus series, units of otel_ml_* are cleared (no _ratio suffix)."""
    config = _collector_configs()[name]
    statements = config["processors"]["transform/otel_ml_units"]["metric_statements"]
    assert statements == [
        {"context": "metric", "statements": ['set(unit, "") where IsMatch(name, "^otel_ml_")']}
    ]
    assert "transform/otel_ml_units" in config["service"]["pipelines"]["metrics"]["processors"]
    exporters = config["service"]["pipelines"]["metrics"]["exporters"]
    for exporter in exporters:
        assert config["exporters"][exporter]["resource_to_telemetry_conversion"] == {"enabled": True}


def test_compose_collector_exports_to_tempo():
    config = _load(COLLECTOR)
    assert config["exporters"]["prometheus"]["endpoint"] == "0.0.0.0:8889"
    tempo = config["exporters"]["otlp/tempo"]
    assert tempo["endpoint"] == "tempo:4317" and tempo["tls"]["insecure"] is True
    assert config["service"]["pipelines"]["traces"]["exporters"] == ["otlp/tempo"]
    assert "tempo" in _compose()["services"]


# --- Tempo -----------------------------------------------------------------------------------------


def test_tempo_config():
    config = _load(TEMPO)
    assert config["server"]["http_listen_port"] == 3200  # Grafana datasource http://tempo:3200
    assert config["distributor"]["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"] == "0.0.0.0:4317"
    storage = config["storage"]["trace"]
    assert storage["backend"] == "local"
    volumes = _compose()["services"]["tempo"]["volumes"]
    data_mount = next(v.split(":")[1] for v in volumes if v.startswith("tempo-data:"))
    for key in ("wal", "local"):
        assert storage[key]["path"].startswith(data_mount + "/"), f"{key} path outside the volume"


# --- Kubernetes -------------------------------------------------------------------------------------


def test_k8s_manifests_have_the_expected_kinds():
    assert {p.name for p in K8S.glob("*.yaml")} == set(K8S_KINDS)
    for name, kinds in K8S_KINDS.items():
        docs = _docs(K8S / name)
        assert {(d["apiVersion"], d["kind"]) for d in docs} == kinds, name
        for doc in docs:
            assert doc["metadata"]["name"], name


def _pod_specs() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(file, workload, pod template) of every workload in deploy/k8s."""
    specs = []
    for name in K8S_KINDS:
        for doc in _docs(K8S / name):
            if doc["kind"] in ("Deployment", "DaemonSet", "Job"):
                specs.append((name, doc, doc["spec"]["template"]))
    return specs


def test_k8s_images_pinned_and_selectors_match():
    assert len(_pod_specs()) == 3
    for name, workload, template in _pod_specs():
        for container in template["spec"]["containers"]:
            assert _pinned(container["image"]), f"{name}: {container['image']}"
        selector = workload["spec"].get("selector", {}).get("matchLabels", {})
        labels = template["metadata"]["labels"]
        assert selector.items() <= labels.items(), f"{name}: selector does not match the pod labels"


def test_k8s_services_select_their_pods():
    gateway = K8S / "collector-gateway.yaml"
    service = _by_kind(gateway, "Service")
    pod = _by_kind(gateway, "Deployment")["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    port_names = {p["name"] for c in pod["spec"]["containers"] for p in c["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names
    assert {p["port"] for p in service["spec"]["ports"]} == {4317, 4318}


def test_k8s_agent_forwards_to_the_gateway_service():
    agent = _collector_configs()["deploy/k8s/collector-agent.yaml"]
    service = _by_kind(K8S / "collector-gateway.yaml", "Service")
    host, port = agent["exporters"]["otlp/gateway"]["endpoint"].rsplit(":", 1)
    assert host.split(".")[0] == service["metadata"]["name"]
    assert int(port) in {p["port"] for p in service["spec"]["ports"]}
    daemonset = _by_kind(K8S / "collector-agent.yaml", "DaemonSet")
    (container,) = daemonset["spec"]["template"]["spec"]["containers"]
    host_ports = {(p["containerPort"], p.get("hostPort")) for p in container["ports"]}
    assert host_ports == {(4317, 4317), (4318, 4318)}
    gateway = _collector_configs()["deploy/k8s/collector-gateway.yaml"]
    assert "prometheusremotewrite" in gateway["service"]["pipelines"]["metrics"]["exporters"]
    assert gateway["service"]["pipelines"]["traces"]["exporters"] == ["otlp/tempo"]


def _meta_label(kind: str, name: str) -> str:
    """Prometheus' Kubernetes SD meta label of a pod label or annotation."""
    return f"__meta_kubernetes_pod_{kind}_" + re.sub(r"[^a-zA-Z0-9_]", "_", name)


def test_k8s_podmonitor_matches_the_training_job():
    monitor = _by_kind(K8S / "podmonitor.yaml", "PodMonitor")
    job = _by_kind(K8S / "training-job-example.yaml", "Job")
    template = job["spec"]["template"]
    labels = template["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["honorLabels"] is True
    (container,) = template["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports[endpoint["port"]] == 9464

    # run_id and rank on `up` come from the pod: the run-id label, the completion index
    targets = {}
    for relabel in endpoint["relabelings"]:
        targets.setdefault(relabel["targetLabel"], []).extend(relabel["sourceLabels"])
    assert targets["run_id"] == [_meta_label("label", "otel-ml/run-id")]
    assert "otel-ml/run-id" in labels
    assert _meta_label("annotation", "batch.kubernetes.io/job-completion-index") in targets["rank"]
    assert job["spec"]["completionMode"] == "Indexed"


def test_k8s_training_job_env():
    job = _by_kind(K8S / "training-job-example.yaml", "Job")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["OTEL_EXPORTER_PROMETHEUS_HOST"]["value"] == "0.0.0.0"
    assert env["OTEL_EXPORTER_PROMETHEUS_PORT"]["value"] == "9464"
    assert env["OTEL_ML_RUN_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['otel-ml/run-id']"
    assert env["NODE_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"
    otlp = [e for n, e in env.items() if n.startswith("OTEL_EXPORTER_OTLP_") and "ENDPOINT" in n]
    assert otlp and all(e["value"].startswith("http://$(NODE_IP):4318") for e in otlp)
    names = list(env)
    for name, variable in env.items():  # $(VAR) only expands variables defined earlier
        for ref in re.findall(r"\$\((\w+)\)", variable.get("value", "")):
            assert names.index(ref) < names.index(name), f"{name} uses {ref} before it is defined"
    for arg in container["args"]:
        for ref in re.findall(r"\$\((\w+)\)", arg):
            assert ref in env


def _render_module():
    spec = importlib.util.spec_from_file_location("render_prometheusrule", K8S / "render_prometheusrule.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prometheusrule_in_sync_with_rule_files():
    shipped_groups = [group for path in sorted(RULES_DIR.glob("*.yaml")) for group in _load(path)["groups"]]
    assert len(shipped_groups) >= 2
    rule = _by_kind(K8S / "prometheusrule.yaml", "PrometheusRule")
    assert rule["spec"]["groups"] == shipped_groups, (
        "deploy/k8s/prometheusrule.yaml is out of date: run python deploy/k8s/render_prometheusrule.py"
    )
    module = _render_module()
    assert module.rule_groups() == shipped_groups
    assert module.main(["--check"]) == 0
    assert yaml.safe_load(module.render()) == rule

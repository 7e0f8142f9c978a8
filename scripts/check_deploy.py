#!/usr/bin/env python3
"""Checks the deploy files that cannot be run here (no Docker engine, no cluster).

Parses every YAML file, checks that what they reference exists and that ports agree, and
that the Kubernetes PrometheusRule carries exactly the rules of alerts.yml. Prints the
facts the Rust test (tests/deploy.rs) checks against tokenrelay's own config parser, as
JSON. Exits non-zero, naming the file and the problem, when something is off.
"""
import ipaddress
import json
import re
import sys
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
problems = []


def fail(where, what):
    problems.append(f"{where}: {what}")


def load(path):
    try:
        return list(yaml.safe_load_all(path.read_text()))
    except yaml.YAMLError as e:
        fail(path.relative_to(ROOT), f"not valid YAML: {e}")
        return []


facts = {}

# docker-compose.yml
compose = load(DEPLOY / "docker-compose.yml")[0]
tr = compose["services"]["tokenrelay"]
dockerfile = ROOT / tr["build"]["dockerfile"]
if not dockerfile.is_file():
    fail("docker-compose.yml", f"build.dockerfile {tr['build']['dockerfile']} does not exist")
if (DEPLOY / tr["build"]["context"]).resolve() != ROOT:
    fail("docker-compose.yml", "build.context must be the repository root")
published = {int(p.rsplit(":", 1)[1]) for p in tr["ports"]}
facts["compose_container_ports"] = sorted(published)
for v in tr["volumes"]:
    host, container = v.split(":")[:2]
    if container == "/credentials" and v.endswith(":ro"):
        fail("docker-compose.yml", "the credentials volume must be writable")
prom = compose["services"]["prometheus"]
for v in prom["volumes"]:
    host = v.split(":")[0]
    if host.startswith("./") and not (DEPLOY / host).exists():
        fail("docker-compose.yml", f"volume {host} does not exist")

# Dockerfile
text = dockerfile.read_text()
for src in re.findall(r"^COPY (?!--from)(\S+)", text, re.M):
    if not (ROOT / src).exists():
        fail("deploy/Dockerfile", f"COPY {src}: no such path")
for must in ("HEALTHCHECK", "USER nonroot", "FROM rust:", "AS build"):
    if must not in text:
        fail("deploy/Dockerfile", f"missing {must}")
facts["docker_config"] = str(DEPLOY / "docker" / "config.toml")
facts["docker_expose"] = sorted(int(p) for p in re.findall(r"^EXPOSE (.*)$", text, re.M)[0].split())

# prometheus.yml
prom_cfg = load(DEPLOY / "prometheus" / "prometheus.yml")[0]
targets = [t for sc in prom_cfg["scrape_configs"] for s in sc["static_configs"] for t in s["targets"]]
facts["prometheus_target_ports"] = sorted({int(t.rsplit(":", 1)[1]) for t in targets})
for rf in prom_cfg["rule_files"]:
    if not (DEPLOY / "prometheus" / rf).is_file():
        fail("prometheus.yml", f"rule file {rf} does not exist")

# Kubernetes
k8s = {}
for f in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
    for doc in load(f):
        if doc:
            k8s.setdefault(doc["kind"], []).append((f.name, doc))
cm = k8s["ConfigMap"][0][1]
facts["k8s_config_toml"] = cm["data"]["config.toml"]
dep = k8s["Deployment"][0][1]
spec = dep["spec"]["template"]["spec"]
sidecar = next(c for c in spec.get("initContainers", []) if c["name"] == "tokenrelay")
if sidecar.get("restartPolicy") != "Always":
    fail("deployment.yaml", "tokenrelay must be a native sidecar (initContainers + restartPolicy: Always)")
for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
    if probe not in sidecar:
        fail("deployment.yaml", f"tokenrelay has no {probe}")
if "requests" not in sidecar.get("resources", {}):
    fail("deployment.yaml", "tokenrelay has no resource requests")
ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
facts["k8s_admin_port"] = ports["admin"]
for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
    port = sidecar[probe]["httpGet"]["port"]
    if port not in ports and port not in ports.values():
        fail("deployment.yaml", f"{probe} uses port {port}, which the container does not declare")
facts["k8s_probe_paths"] = sorted({sidecar[p]["httpGet"]["path"] for p in ("startupProbe", "readinessProbe", "livenessProbe")})
annotations = dep["spec"]["template"]["metadata"].get("annotations", {})
facts["k8s_scrape_port"] = int(annotations.get("prometheus.io/port", 0))
mounts = {m["name"]: m for m in sidecar["volumeMounts"]}
volumes = {v["name"]: v for v in spec["volumes"]}
for name, m in mounts.items():
    if name not in volumes:
        fail("deployment.yaml", f"volumeMount {name} has no volume")
if not mounts["credentials"].get("readOnly") or "secret" not in volumes["credentials"]:
    fail("deployment.yaml", "credentials must be a Secret mounted read-only")
if "emptyDir" not in volumes["state"]:
    fail("deployment.yaml", "the state_dir volume must be an emptyDir")
facts["k8s_mounts"] = {n: m["mountPath"] for n, m in mounts.items()}
app = spec["containers"][0]
facts["k8s_app_urls"] = [e["value"] for e in app.get("env", []) if str(e.get("value", "")).startswith("http://127.0.0.1")]
if volumes["config"]["configMap"]["name"] != cm["metadata"]["name"]:
    fail("deployment.yaml", "the config volume does not use the tokenrelay ConfigMap")
secret_name = volumes["credentials"]["secret"]["secretName"]
if not any(d["metadata"]["name"] == secret_name for _, d in k8s.get("Secret", [])):
    fail("deployment.yaml", f"Secret {secret_name} is not defined in deploy/kubernetes")
pm = k8s["PodMonitor"][0][1]
if pm["spec"]["selector"]["matchLabels"].items() - dep["spec"]["template"]["metadata"]["labels"].items():
    fail("podmonitor.yaml", "selector does not match the pod labels")
if pm["spec"]["podMetricsEndpoints"][0]["port"] not in ports:
    fail("podmonitor.yaml", "scrapes a port the sidecar does not declare")
alerts = load(DEPLOY / "prometheus" / "alerts.yml")[0]
rule = k8s["PrometheusRule"][0][1]
if rule["spec"]["groups"] != alerts["groups"]:
    fail("prometheusrule.yaml", "its groups differ from deploy/prometheus/alerts.yml; regenerate it")

# Grafana
dash = json.loads((DEPLOY / "grafana" / "tokenrelay.json").read_text())
facts["grafana_metrics"] = sorted({m for p in dash["panels"] for t in p["targets"] for m in re.findall(r"tokenrelay_[a-z_]+", t["expr"])})
facts["alert_metrics"] = sorted({m for g in alerts["groups"] for r in g["rules"] for m in re.findall(r"tokenrelay_[a-z_]+", r["expr"])})

# The Host rule (src/proxy/browser.rs): a loopback listener, and any listener once
# server.allowed_hosts is set, answers only its own names. Kubelet probes and Prometheus
# in Kubernetes send the pod IP as Host; compose's Prometheus sends the service name.
POD_IP = "10.0.0.7"


def host_admitted(config_text, listen_key, host):
    server = tomllib.loads(config_text).get("server", {})
    listen = server.get(listen_key, "127.0.0.1:9090")
    ip = listen.rsplit(":", 1)[0].strip("[]")
    allowed = [h.lower() for h in server.get("allowed_hosts", [])]
    if not ipaddress.ip_address(ip).is_loopback and not allowed:
        return True
    name = host.rsplit(":", 1)[0].lower() if not host.startswith("[") else host.split("]")[0] + "]"
    own = {"localhost", "127.0.0.1", "[::1]", ip}
    return name in own or name in allowed or any(
        a.startswith("*.") and name.endswith(a[1:]) and len(name) > len(a) - 1 for a in allowed)


probe_hosts = []
for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
    headers = {h["name"].lower(): h["value"] for h in sidecar[probe]["httpGet"].get("httpHeaders", [])}
    probe_hosts.append(headers.get("host", f"{POD_IP}:{ports['admin']}"))
facts["k8s_probe_hosts"] = sorted(set(probe_hosts))
facts["k8s_scrape_host"] = f"{POD_IP}:{ports['admin']}"
for host in facts["k8s_probe_hosts"] + [facts["k8s_scrape_host"]]:
    if not host_admitted(cm["data"]["config.toml"], "admin_listen", host):
        fail("configmap.yaml", f"kubelet probes and Prometheus reach the admin listener as Host {host}, which server.allowed_hosts refuses: drop allowed_hosts or add the probes' httpHeaders Host")
facts["compose_scrape_hosts"] = sorted(set(targets))
docker_cfg = (DEPLOY / "docker" / "config.toml").read_text()
for host in targets:
    if not host_admitted(docker_cfg, "admin_listen", host):
        fail("docker/config.toml", f"Prometheus scrapes {host}, which the Host rule refuses: add {host.rsplit(':', 1)[0]!r} to server.allowed_hosts")

if problems:
    print("\n".join(problems), file=sys.stderr)
    sys.exit(1)
print(json.dumps(facts))

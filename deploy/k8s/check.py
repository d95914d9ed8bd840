"""`make k8s-check`: builds every overlay offline and checks what Kubernetes would be given.

Checks the hardening STYLE.md asks of every pod, the wiring between objects (Services to named ports,
ServiceAccounts, ConfigMaps, disruption budgets), each overlay's mode, that no Secret value is committed,
and that the monitoring component's PrometheusRule and dashboard agree with their sources.
`--write-prometheusrule` regenerates components/monitoring/prometheusrule.yaml from alerts.rules.yml.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

K8S_DIR = Path(__file__).resolve().parent
OVERLAYS = sorted(path.parent for path in (K8S_DIR / "overlays").glob("*/kustomization.yaml"))
MONITORING_DIR = K8S_DIR / "components" / "monitoring"
RULES_FILE = MONITORING_DIR / "alerts.rules.yml"
PROMETHEUS_RULE_FILE = MONITORING_DIR / "prometheusrule.yaml"
DASHBOARD_FILE = MONITORING_DIR / "dashboard.json"
DASHBOARD_README = MONITORING_DIR / "README.md"

# Seconds each process may take to stop after SIGTERM; the pod must give it more than that.
GATEWAY_SHUTDOWN_GRACE = 10.0
DEFAULT_SHUTDOWN_GRACE = 5.0
IVS_CALLERS = ("stagemanager", "allocator", "monitor")
IRSA_ANNOTATION = "eks.amazonaws.com/role-arn"
PROMETHEUS_RULE_HEADER = (
    "# Generated from alerts.rules.yml by `python deploy/k8s/check.py --write-prometheusrule`;\n"
    "# `make k8s-check` fails when it is stale. Edit alerts.rules.yml, not this file.\n"
)

Doc = dict[str, Any]


def find_kubectl() -> str:
    """kubectl with an embedded kustomize new enough for `components` and `labels` (v5+, kubectl 1.27+)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise SystemExit("k8s-check: kubectl is not installed (Debian: kubernetes-client)")
    version = subprocess.run(  # noqa: S603 - fixed arguments
        [kubectl, "version", "--client", "-o", "json"], capture_output=True, text=True, check=False
    )
    kustomize_version = json.loads(version.stdout or "{}").get("kustomizeVersion", "v0")
    major, _, rest = kustomize_version.lstrip("v").partition(".")
    minor = rest.partition(".")[0]
    if not (major.isdigit() and minor.isdigit()) or (int(major), int(minor)) < (5, 0):
        raise SystemExit(
            f"k8s-check: {kubectl} embeds kustomize {kustomize_version}; these manifests need v5.0 or newer"
        )
    return kubectl


def kustomize(kubectl: str, directory: Path) -> list[Doc]:
    # Offline: kustomize reads only the files under deploy/k8s.
    built = subprocess.run(  # noqa: S603 - fixed arguments, a path inside this repository
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, check=False
    )
    if built.returncode != 0:
        raise SystemExit(f"k8s-check: kubectl kustomize {directory} failed:\n{built.stderr}")
    return [doc for doc in yaml.safe_load_all(built.stdout) if doc is not None]


def render_prometheus_rule() -> str:
    rules = yaml.safe_load(RULES_FILE.read_text())
    resource = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "ivs-fanout", "labels": {"app.kubernetes.io/name": "ivs-fanout-alerts"}},
        "spec": {"groups": rules["groups"]},
    }
    return PROMETHEUS_RULE_HEADER + yaml.safe_dump(resource, sort_keys=False, width=120)


class Findings:
    def __init__(self) -> None:
        self.problems: list[str] = []

    def check(self, condition: bool, where: str, message: str) -> None:
        if not condition:
            self.problems.append(f"{where}: {message}")


def by_kind(docs: list[Doc], kind: str) -> dict[str, Doc]:
    return {doc["metadata"]["name"]: doc for doc in docs if doc.get("kind") == kind}


def containers(pod: Doc) -> Iterator[Doc]:
    yield from pod.get("initContainers", [])
    yield from pod["containers"]


def env_value(container: Doc, name: str) -> Doc | None:
    return next((item for item in container.get("env", []) if item["name"] == name), None)


def shutdown_grace(name: str, container: Doc, config_maps: dict[str, Doc]) -> float:
    if name == "gateway":
        return GATEWAY_SHUTDOWN_GRACE
    value = env_value(container, "FANOUT_SHUTDOWN_GRACE_SECONDS")
    if value is not None and "value" in value:
        return float(value["value"])
    for source in container.get("envFrom", []):
        ref = source.get("configMapRef", {}).get("name")
        data = config_maps.get(ref, {}).get("data", {})
        if "FANOUT_SHUTDOWN_GRACE_SECONDS" in data:
            return float(data["FANOUT_SHUTDOWN_GRACE_SECONDS"])
    return DEFAULT_SHUTDOWN_GRACE


def check_deployment(name: str, deployment: Doc, docs: list[Doc], found: Findings) -> None:
    where = f"Deployment/{name}"
    pod = deployment["spec"]["template"]["spec"]
    config_maps = by_kind(docs, "ConfigMap")
    security = pod.get("securityContext", {})
    found.check(security.get("runAsNonRoot") is True, where, "pod securityContext.runAsNonRoot must be true")
    found.check(
        security.get("seccompProfile", {}).get("type") == "RuntimeDefault",
        where,
        "seccompProfile RuntimeDefault",
    )
    found.check(
        pod.get("automountServiceAccountToken") is False, where, "automountServiceAccountToken: false"
    )
    account = pod.get("serviceAccountName")
    found.check(
        account in by_kind(docs, "ServiceAccount"), where, f"ServiceAccount {account!r} is not defined"
    )
    volumes = {volume["name"]: volume for volume in pod.get("volumes", [])}
    for container in containers(pod):
        cwhere = f"{where} container {container['name']}"
        csec = container.get("securityContext", {})
        found.check(csec.get("readOnlyRootFilesystem") is True, cwhere, "readOnlyRootFilesystem: true")
        found.check(csec.get("allowPrivilegeEscalation") is False, cwhere, "allowPrivilegeEscalation: false")
        found.check(csec.get("capabilities", {}).get("drop") == ["ALL"], cwhere, "capabilities.drop: [ALL]")
        found.check(":latest" not in container["image"], cwhere, "no :latest image tag")
        resources = container.get("resources", {})
        for part in ("requests", "limits"):
            for resource in ("cpu", "memory"):
                found.check(
                    resource in resources.get(part, {}), cwhere, f"resources.{part}.{resource} missing"
                )
        ports = container.get("ports", [])
        found.check(bool(ports), cwhere, "no container ports")
        found.check(all(port.get("name") for port in ports), cwhere, "every container port must be named")
        port_names = {port.get("name") for port in ports}
        for probe in ("livenessProbe", "readinessProbe"):
            spec = container.get(probe)
            found.check(spec is not None, cwhere, f"{probe} missing")
            if spec is None:
                continue
            if "grpc" in port_names:
                grpc_port = next(port["containerPort"] for port in ports if port["name"] == "grpc")
                found.check(
                    spec.get("grpc", {}).get("port") == grpc_port,
                    cwhere,
                    f"{probe} must be a native gRPC probe",
                )
            else:
                found.check("httpGet" in spec, cwhere, f"{probe} must be an HTTP probe")
        for mount in container.get("volumeMounts", []):
            found.check(mount["name"] in volumes, cwhere, f"volume {mount['name']!r} is not defined")
        for source in container.get("envFrom", []):
            ref = source.get("configMapRef", {}).get("name")
            if ref is not None:
                found.check(ref in config_maps, cwhere, f"ConfigMap {ref!r} is not defined")
        for item in container.get("env", []):
            ref = item.get("valueFrom", {}).get("configMapKeyRef")
            if ref is not None:
                found.check(ref["name"] in config_maps, cwhere, f"ConfigMap {ref['name']!r} is not defined")
        grace = shutdown_grace(name, container, config_maps)
        period = pod.get("terminationGracePeriodSeconds", 30)
        found.check(
            period > grace, where, f"terminationGracePeriodSeconds {period} <= shutdown grace {grace}"
        )
    if name != "ivslocal":
        annotations = deployment["spec"]["template"]["metadata"].get("annotations", {})
        found.check(
            annotations.get("prometheus.io/scrape") == "true", where, "prometheus.io/scrape annotation"
        )
    replicas = deployment["spec"].get("replicas", 1)
    if replicas > 1:
        selector = deployment["spec"]["selector"]["matchLabels"]
        budgets = [
            pdb
            for pdb in by_kind(docs, "PodDisruptionBudget").values()
            if pdb["spec"]["selector"].get("matchLabels") == selector
        ]
        found.check(bool(budgets), where, f"{replicas} replicas but no PodDisruptionBudget selects them")


def check_services(docs: list[Doc], found: Findings) -> None:
    deployments = by_kind(docs, "Deployment")
    for name, service in by_kind(docs, "Service").items():
        where = f"Service/{name}"
        selector = service["spec"].get("selector", {})
        targets = [
            deployment
            for deployment in deployments.values()
            if selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
        ]
        found.check(len(targets) == 1, where, f"selector {selector} matches {len(targets)} Deployments")
        if len(targets) != 1:
            continue
        named = {
            port["name"]
            for container in targets[0]["spec"]["template"]["spec"]["containers"]
            for port in container.get("ports", [])
        }
        for port in service["spec"]["ports"]:
            found.check(port.get("name") is not None, where, "every Service port must be named")
            found.check(
                port.get("targetPort") in named,
                where,
                f"targetPort {port.get('targetPort')!r} is no named port",
            )


def check_local(docs: list[Doc], found: Findings) -> None:
    data = by_kind(docs, "ConfigMap")
    config = next((cm["data"] for name, cm in data.items() if name.startswith("fanout-config")), {})
    found.check(config.get("FANOUT_MODE") == "local", "overlay local", "FANOUT_MODE=local")
    found.check(
        "ivslocal" in by_kind(docs, "Deployment"), "overlay local", "the ivslocal emulator Deployment"
    )
    found.check(
        config.get("FANOUT_IVS_ENDPOINT", "").startswith("http://ivslocal:"),
        "overlay local",
        "FANOUT_IVS_ENDPOINT must point at the ivslocal Service",
    )


def check_aws(docs: list[Doc], found: Findings) -> None:
    data = by_kind(docs, "ConfigMap")
    config = next((cm["data"] for name, cm in data.items() if name.startswith("fanout-config")), {})
    found.check(config.get("FANOUT_MODE") == "aws", "overlay aws", "FANOUT_MODE=aws")
    found.check(bool(config.get("AWS_REGION")), "overlay aws", "AWS_REGION")
    found.check(config.get("FANOUT_LOG_JSON") == "true", "overlay aws", "JSON logs")
    accounts = by_kind(docs, "ServiceAccount")
    for name in IVS_CALLERS:
        annotations = accounts.get(name, {}).get("metadata", {}).get("annotations", {})
        found.check(IRSA_ANNOTATION in annotations, f"ServiceAccount/{name}", "IRSA role annotation")
    deployments = by_kind(docs, "Deployment")
    found.check("ivslocal" not in deployments, "overlay aws", "no IVS emulator in AWS mode")
    gateway = deployments["gateway"]["spec"]["template"]["spec"]["containers"][0]
    keys = (env_value(gateway, "FANOUT_PUBLISHER_KEYS") or {}).get("valueFrom", {}).get("secretKeyRef", {})
    found.check(keys.get("optional") is False, "overlay aws", "publisher keys Secret must be required")
    allocator_pod = deployments["allocator"]["spec"]["template"]["spec"]
    allocator = allocator_pod["containers"][0]
    key_file = (env_value(allocator, "FANOUT_SIGNING_KEY_FILE") or {}).get("value", "")
    secret_volumes = {volume["name"] for volume in allocator_pod.get("volumes", []) if "secret" in volume}
    mounted = any(
        mount["name"] in secret_volumes and key_file.startswith(mount["mountPath"] + "/")
        for mount in allocator.get("volumeMounts", [])
    )
    found.check(mounted, "overlay aws", "FANOUT_SIGNING_KEY_FILE must be inside a mounted Secret volume")


def check_schemas(overlay: str, docs: list[Doc], found: Findings) -> bool:
    """Validates built-in kinds against the Kubernetes OpenAPI schemas if kubernetes-validate is installed."""
    try:
        import kubernetes_validate
    except ImportError:
        return False
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue
        try:
            kubernetes_validate.validate(doc, "1.30.0", strict=True)
        except kubernetes_validate.ValidationError as error:
            found.problems.append(f"{overlay} {doc['kind']}/{doc['metadata']['name']}: {error.message}")
    return True


def check_monitoring(found: Findings) -> None:
    found.check(
        PROMETHEUS_RULE_FILE.read_text() == render_prometheus_rule(),
        str(PROMETHEUS_RULE_FILE.relative_to(K8S_DIR)),
        "stale: run `python deploy/k8s/check.py --write-prometheusrule`",
    )
    dashboard = json.loads(DASHBOARD_FILE.read_text())
    variables = {var["name"]: var for var in dashboard["templating"]["list"]}
    found.check(
        variables.get("datasource", {}).get("type") == "datasource", "dashboard", "datasource variable"
    )
    found.check("room" in variables, "dashboard", "$room variable")
    readme = DASHBOARD_README.read_text()
    panels = [panel for panel in dashboard["panels"] if panel["type"] != "row"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    found.check(len(ids) == len(set(ids)), "dashboard", "panel ids must be unique")
    for panel in panels:
        where = f"dashboard panel {panel['title']!r}"
        found.check(
            panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where, "datasource var"
        )
        found.check(f"**{panel['title']}**" in readme, where, "no line in README.md")
        found.check(bool(panel.get("targets")), where, "no queries")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--write-prometheusrule", action="store_true", help="regenerate prometheusrule.yaml")
    args = parser.parse_args(argv)
    if args.write_prometheusrule:
        PROMETHEUS_RULE_FILE.write_text(render_prometheus_rule())
        print(f"wrote {PROMETHEUS_RULE_FILE.relative_to(K8S_DIR.parent.parent)}")
        return 0
    found = Findings()
    kubectl = find_kubectl()
    for overlay in OVERLAYS:
        docs = kustomize(kubectl, overlay)
        found.check(
            not any(doc["kind"] == "Secret" for doc in docs), overlay.name, "Secrets must not be committed"
        )
        for name, deployment in by_kind(docs, "Deployment").items():
            check_deployment(name, deployment, docs, found)
        check_services(docs, found)
        {"local": check_local, "aws": check_aws}.get(overlay.name, lambda docs, found: None)(docs, found)
        schemas = check_schemas(overlay.name, docs, found)
        kinds = sorted({doc["kind"] for doc in docs})
        print(
            f"overlay {overlay.name}: {len(docs)} objects ({', '.join(kinds)}); "
            f"schemas {'validated' if schemas else 'not validated (kubernetes-validate not installed)'}"
        )
    check_monitoring(found)
    for problem in found.problems:
        print(f"  FAIL {problem}", file=sys.stderr)
    if found.problems:
        print(f"k8s-check: {len(found.problems)} problem(s)", file=sys.stderr)
        return 1
    print("k8s-check: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())

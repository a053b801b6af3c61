#!/usr/bin/env python3
"""Checks the Helm chart charts/tenantry with Helm's own code, offline.

- Renders and lints (strict) the chart through helm-python-sdk, which binds Helm's Go SDK
  (libhelm_c, shipped in the wheel): no helm binary, no cluster, no network.
- Bad values must fail: an empty required Secret name, a wrong type, an unknown key, a bad
  duration, ... each case is printed with Helm's message.
- Every rendered object, and the CRD, validates against the Kubernetes 1.36 schemas in
  strict mode (kubernetes-validate, schemas shipped in the wheel).
- The rendered ClusterRoles and Role hold exactly the rules of charts/tenantry/rbac/*.yaml
  (the files the Rust RBAC test reads), every pod template meets Pod Security
  "restricted", every object carries the app.kubernetes.io labels, and the chart's
  defaults match the operator's.
- Every rule in charts/tenantry/rbac/*.yaml has a `# why:` comment directly above it, and
  the table between the rbac-table markers in docs/security.md is exactly what
  `--rbac-table` generates from the rendered roles and those reasons.

`--requirements` prints the pinned packages for `pip install` (see .ci/run).
`--rbac-table` prints that table (Markdown); `--write-rbac-table` writes it into
docs/security.md between the markers.
`--render-rbac NAMESPACE` prints the chart's ServiceAccounts, Roles, ClusterRoles and their
bindings, rendered for release "tenantry" in NAMESPACE with ci/values-minimal.yaml (the
real-cluster tests apply them, so the real authorizer checks the chart's rules).
Exits non-zero on any failure.
"""

from __future__ import annotations

import copy
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

# Exact pins, installed by .ci/run. helm-python-sdk has no dependencies; the rest are
# kubernetes-validate and its dependency tree.
REQUIREMENTS = [
    "helm-python-sdk==0.2.2",
    "kubernetes-validate==1.37.0",
    "jsonschema==4.26.0",
    "jsonschema-specifications==2025.9.1",
    "referencing==0.37.0",
    "rpds-py==0.30.0",
    "attrs==26.1.0",
    "importlib-resources==7.1.0",
    "packaging==26.4",
    "PyYAML==6.0.3",
    "typing-extensions==4.15.0",
]

KUBERNETES_VERSION = "1.36.0"

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "tenantry"
CI_VALUES = CHART / "ci"
RBAC = CHART / "rbac"
OPERATOR_SRC = ROOT / "operator" / "src"
KUBE_SRC = ROOT / "kube" / "src"

RELEASE = "tenantry"
NAMESPACE = "tenantry-system"

SECURITY_DOC = ROOT / "docs" / "security.md"
TABLE_BEGIN = "<!-- rbac-table:begin -->"
TABLE_END = "<!-- rbac-table:end -->"
REGENERATE = "python3 .ci/chart_check.py --write-rbac-table"
WHY = "# why:"

# Cluster-scoped built-in resources (by API group) that a rule might name; every other
# built-in resource is namespaced. The chart's CRDs say their own scope.
CLUSTER_SCOPED = {
    ("", "namespaces"),
    ("", "nodes"),
    ("", "persistentvolumes"),
    ("admissionregistration.k8s.io", "mutatingwebhookconfigurations"),
    ("admissionregistration.k8s.io", "validatingwebhookconfigurations"),
    ("apiextensions.k8s.io", "customresourcedefinitions"),
    ("apiregistration.k8s.io", "apiservices"),
    ("certificates.k8s.io", "certificatesigningrequests"),
    ("networking.k8s.io", "ingressclasses"),
    ("node.k8s.io", "runtimeclasses"),
    ("rbac.authorization.k8s.io", "clusterrolebindings"),
    ("rbac.authorization.k8s.io", "clusterroles"),
    ("scheduling.k8s.io", "priorityclasses"),
    ("storage.k8s.io", "csidrivers"),
    ("storage.k8s.io", "csinodes"),
    ("storage.k8s.io", "storageclasses"),
    ("storage.k8s.io", "volumeattachments"),
}

STANDARD_LABELS = [
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/component",
    "app.kubernetes.io/part-of",
    "app.kubernetes.io/managed-by",
    "helm.sh/chart",
]

# Pod Security "restricted": the volume types it allows.
RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


class Report:
    """Counts checks and prints one line each."""

    def __init__(self) -> None:
        self.passed = 0
        self.failures: list[str] = []

    def ok(self, what: str) -> None:
        self.passed += 1
        print(f"  ok    {what}")

    def fail(self, what: str, why: str) -> None:
        self.failures.append(f"{what}: {why}")
        print(f"  FAIL  {what}\n        {why.replace(chr(10), chr(10) + '        ')}")

    def check(self, what: str, problems: list[str]) -> None:
        if problems:
            self.fail(what, "\n".join(problems))
        else:
            self.ok(what)


def first_lines(text: str, n: int = 4) -> str:
    lines = [l for l in str(text).strip().splitlines() if l.strip()]
    more = " ..." if len(lines) > n else ""
    return " | ".join(l.strip() for l in lines[:n]) + more


def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def set_path(values: dict, path: str, value: Any) -> dict:
    out = copy.deepcopy(values)
    node = out
    keys = path.split(".")
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = value
    return out


# ---------------------------------------------------------------------------------------
# Rendering


def render(helm: Any, values: dict, release: str, namespace: str) -> dict[str, str]:
    with helm.Chart.load(str(CHART)) as chart:
        return chart.render(values, name=release, namespace=namespace, is_install=True)


def objects_of(yaml: Any, manifests: dict[str, str]) -> list[tuple[str, dict]]:
    objs = []
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                objs.append((path, doc))
    return objs


def lint(helm: Any, values: dict, namespace: str) -> list[str]:
    """Strict lint; returns the findings above INFO (strict turns warnings into errors)."""
    result = helm.lint(
        str(CHART),
        values,
        strict=True,
        namespace=namespace,
        kube_version=f"v{KUBERNETES_VERSION}",
    )
    findings = [
        f"{m.get('path')}: {m.get('error')}"
        for m in result.get("messages", [])
        if int(m.get("severity", 0)) >= 2
    ]
    findings += [e for e in result.get("errors", []) if e not in str(findings)]
    return findings


# ---------------------------------------------------------------------------------------
# Checks on rendered objects


def kind_name(obj: dict) -> str:
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


def check_labels(obj: dict) -> list[str]:
    problems = []
    labels = obj.get("metadata", {}).get("labels") or {}
    missing = [l for l in STANDARD_LABELS if not labels.get(l)]
    if missing:
        problems.append(f"{kind_name(obj)} lacks labels {missing}")
    if labels.get("app.kubernetes.io/part-of") not in (None, "tenantry"):
        problems.append(f"{kind_name(obj)}: part-of is {labels.get('app.kubernetes.io/part-of')!r}")
    template = pod_template(obj)
    if template is not None:
        tlabels = template.get("metadata", {}).get("labels") or {}
        missing = [l for l in STANDARD_LABELS if not tlabels.get(l)]
        if missing:
            problems.append(f"{kind_name(obj)} pod template lacks labels {missing}")
        selector = obj["spec"].get("selector", {}).get("matchLabels", {})
        if any(tlabels.get(k) != v for k, v in selector.items()):
            problems.append(f"{kind_name(obj)}: selector {selector} does not match its pod labels")
    return problems


def pod_template(obj: dict) -> dict | None:
    if obj.get("kind") in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        return obj["spec"]["template"]
    if obj.get("kind") == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]
    return None


def check_restricted(obj: dict) -> list[str]:
    """Pod Security Standards, level "restricted" (plus the chart's read-only root)."""
    template = pod_template(obj)
    if template is None:
        return []
    where = kind_name(obj)
    spec = template["spec"]
    psc = spec.get("securityContext") or {}
    problems = []
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(field):
            problems.append(f"{where}: {field} is set")
    for vol in spec.get("volumes") or []:
        kinds = set(vol) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            problems.append(f"{where}: volume {vol.get('name')} uses {sorted(kinds)}")
    if psc.get("runAsUser") == 0:
        problems.append(f"{where}: pod runAsUser is 0")
    if (psc.get("seccompProfile") or {}).get("type") not in (None, "RuntimeDefault", "Localhost"):
        problems.append(f"{where}: pod seccompProfile is {psc.get('seccompProfile')}")
    for sysctl in psc.get("sysctls") or []:
        problems.append(f"{where}: sysctl {sysctl.get('name')} is set")
    containers = (spec.get("initContainers") or []) + spec["containers"]
    for c in containers:
        cw = f"{where} container {c['name']}"
        sc = c.get("securityContext") or {}
        if sc.get("privileged"):
            problems.append(f"{cw}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{cw}: allowPrivilegeEscalation must be false")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            problems.append(f"{cw}: capabilities.drop must contain ALL")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            problems.append(f"{cw}: adds capabilities {caps.get('add')}")
        if not (sc.get("runAsNonRoot") is True or (psc.get("runAsNonRoot") is True and sc.get("runAsNonRoot") is not False)):
            problems.append(f"{cw}: runAsNonRoot must be true")
        if sc.get("runAsUser") == 0:
            problems.append(f"{cw}: runAsUser is 0")
        seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{cw}: seccompProfile must be RuntimeDefault or Localhost, is {seccomp}")
        if (sc.get("procMount") or "Default") != "Default":
            problems.append(f"{cw}: procMount {sc.get('procMount')}")
        if sc.get("seLinuxOptions", {}).get("type") not in (None, "", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"):
            problems.append(f"{cw}: seLinuxOptions.type {sc['seLinuxOptions']['type']}")
        for p in c.get("ports") or []:
            if p.get("hostPort"):
                problems.append(f"{cw}: hostPort {p['hostPort']}")
        if sc.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{cw}: readOnlyRootFilesystem must be true")
        uid = sc.get("runAsUser", psc.get("runAsUser"))
        if uid != 65532:
            problems.append(f"{cw}: runs as UID {uid}, want 65532 (distroless nonroot)")
    return problems


RULE_FILES = ("operator-cluster-rules", "operator-namespace-rules", "api-cluster-rules", "api-namespace-rules")
# The one name a rule file holds that the chart replaces by a value: the token public key
# Secret of api-namespace-rules (the file names the default).
TOKEN_SECRET_DEFAULT = "tenantry-token-public-key"


def rules_for(name: str, rules: dict[str, list], values: dict) -> list:
    """The rules the chart renders from rule file `name` with `values`."""
    file_rules = rules[name]
    if name != "api-namespace-rules":
        return file_rules
    secret = values.get("tokenPublicKeySecret", TOKEN_SECRET_DEFAULT)
    return [
        {**r, "resourceNames": [secret if n == TOKEN_SECRET_DEFAULT else n for n in r["resourceNames"]]}
        if r.get("resourceNames")
        else r
        for r in file_rules
    ]


def load_rule_files(yaml: Any) -> dict[str, list]:
    rules = {}
    for name in RULE_FILES:
        path = RBAC / f"{name}.yaml"
        text = path.read_text()
        if "{{" in text:
            raise SystemExit(f"{path}: must be plain YAML, without templating")
        rules[name] = yaml.safe_load(text)
    return rules


def rule_summary(rule: dict) -> str:
    groups = ",".join(g or "core" for g in rule.get("apiGroups") or [])
    return f"{groups} {','.join(rule.get('resources') or [])} [{','.join(rule.get('verbs') or [])}]"


def rule_reasons(name: str, text: str, file_rules: list) -> tuple[list[str], list[str]]:
    """The reason of each rule of a rule file, in order, from the `# why:` comment directly
    above it (continued on the comment lines that follow it, up to the rule); and the
    problems: a rule without a reason, a `# why:` that sits above no rule, a file whose
    rules are not written one per `- ` item at column 0."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("- ")]
    if not isinstance(file_rules, list) or len(starts) != len(file_rules):
        return [], [f"{name}.yaml: write each rule as a block item starting with '- ' at column 0, so its `# why:` comment can be found"]
    reasons, problems, attached = [], [], set()
    for n, (start, rule) in enumerate(zip(starts, file_rules)):
        block = []
        i = start - 1
        while i >= 0 and lines[i].startswith("#"):
            block.insert(0, i)
            i -= 1
        whys = [i for i in block if lines[i].startswith(WHY)]
        attached.update(whys)
        if len(whys) > 1:
            problems.append(f"{name}.yaml line {start + 1}: rule {n} ({rule_summary(rule)}) has {len(whys)} `# why:` comments; keep one")
        if not whys:
            problems.append(f"{name}.yaml line {start + 1}: rule {n} ({rule_summary(rule)}) has no `# why:` comment directly above it")
            reasons.append("")
            continue
        first = whys[-1]
        words = [lines[first][len(WHY):].strip()]
        words += [lines[i].lstrip("#").strip() for i in range(first + 1, start)]
        reason = " ".join(w for w in words if w)
        if not reason:
            problems.append(f"{name}.yaml line {first + 1}: the `# why:` of rule {n} ({rule_summary(rule)}) is empty")
        reasons.append(reason)
    for i, line in enumerate(lines):
        if line.startswith(WHY) and i not in attached:
            problems.append(f"{name}.yaml line {i + 1}: `# why:` is not directly above a rule")
    return reasons, problems


def load_reasons(rules: dict[str, list]) -> tuple[dict[str, list[str]], list[str]]:
    reasons, problems = {}, []
    for name in RULE_FILES:
        file_reasons, file_problems = rule_reasons(name, (RBAC / f"{name}.yaml").read_text(), rules.get(name))
        reasons[name] = file_reasons
        problems += file_problems
    return reasons, problems


def check_rule_files(rules: dict[str, list]) -> list[str]:
    """Static rules for the rule files themselves: least privilege, well formed."""
    problems = []
    unrestrictable = {"list", "watch", "create", "deletecollection"}
    for name, file_rules in rules.items():
        if not isinstance(file_rules, list) or not file_rules:
            problems.append(f"{name}: must be a non-empty list of PolicyRules")
            continue
        for i, rule in enumerate(file_rules):
            where = f"{name}[{i}]"
            extra = set(rule) - {"apiGroups", "resources", "resourceNames", "verbs"}
            if extra:
                problems.append(f"{where}: unexpected fields {sorted(extra)}")
            for field in ("apiGroups", "resources", "verbs"):
                if not isinstance(rule.get(field), list) or not rule.get(field):
                    problems.append(f"{where}: {field} must be a non-empty list")
            for field in ("apiGroups", "resources", "verbs", "resourceNames"):
                if "*" in (rule.get(field) or []):
                    problems.append(f"{where}: wildcard in {field}")
            if rule.get("resourceNames") and set(rule.get("verbs") or []) & unrestrictable:
                problems.append(f"{where}: resourceNames cannot restrict {sorted(set(rule['verbs']) & unrestrictable)}")
            if "escalate" in (rule.get("verbs") or []) or "bind" in (rule.get("verbs") or []) or "impersonate" in (rule.get("verbs") or []):
                problems.append(f"{where}: grants escalate/bind/impersonate")
    api = rules.get("api-cluster-rules") or []
    for rule in api:
        if rule.get("apiGroups") != ["tenantry.dev"] or rule.get("resources") != ["tenants"]:
            problems.append(f"api-cluster-rules: the API may only touch tenantry.dev/tenants, got {rule}")
    for rule in rules.get("api-namespace-rules") or []:
        if rule.get("resources") != ["secrets"] or rule.get("resourceNames") != [TOKEN_SECRET_DEFAULT]:
            problems.append(f"api-namespace-rules: the API may only touch the token public key Secret, got {rule}")
    return problems


def check_rbac(objs: list[dict], rules: dict[str, list], values: dict) -> list[str]:
    """The rendered roles hold exactly the files' rules; bindings point at chart accounts."""
    problems = []
    roles = [o for o in objs if o["kind"] in ("ClusterRole", "Role")]
    expected = {
        ("ClusterRole", "operator"): "operator-cluster-rules",
        ("Role", "operator"): "operator-namespace-rules",
        ("ClusterRole", "api"): "api-cluster-rules",
        ("Role", "api"): "api-namespace-rules",
    }
    seen = set()
    for role in roles:
        component = role["metadata"].get("labels", {}).get("app.kubernetes.io/component")
        key = (role["kind"], component)
        if key not in expected:
            problems.append(f"unexpected {kind_name(role)} (component {component})")
            continue
        if key in seen:
            problems.append(f"two {role['kind']}s for component {component}")
        seen.add(key)
        if role.get("rules") != rules_for(expected[key], rules, values):
            problems.append(f"{kind_name(role)}: rules differ from rbac/{expected[key]}.yaml")
    for key in set(expected) - seen:
        problems.append(f"no {key[0]} for component {key[1]}")
    accounts = {o["metadata"]["name"] for o in objs if o["kind"] == "ServiceAccount"}
    role_names = {(o["kind"], o["metadata"]["name"]) for o in roles}
    for b in (o for o in objs if o["kind"] in ("ClusterRoleBinding", "RoleBinding")):
        ref = b["roleRef"]
        if (ref["kind"], ref["name"]) not in role_names:
            problems.append(f"{kind_name(b)}: roleRef {ref['kind']}/{ref['name']} is not rendered")
        for s in b.get("subjects") or []:
            if s.get("kind") != "ServiceAccount" or s.get("name") not in accounts:
                problems.append(f"{kind_name(b)}: subject {s} is not a chart ServiceAccount")
    for d in (o for o in objs if o["kind"] == "Deployment"):
        sa = d["spec"]["template"]["spec"].get("serviceAccountName")
        if sa not in accounts:
            problems.append(f"{kind_name(d)}: serviceAccountName {sa} is not rendered")
    return problems


def env_of(deployment: dict) -> dict[str, Any]:
    env = {}
    for e in deployment["spec"]["template"]["spec"]["containers"][0].get("env") or []:
        env[e["name"]] = e.get("value", e.get("valueFrom"))
    return env


def check_programs(objs: list[dict], values: dict, operator_defaults: dict) -> list[str]:
    """The Deployments give the programs what their code reads."""
    problems = []
    by_component = {
        o["metadata"]["labels"]["app.kubernetes.io/component"]: o
        for o in objs
        if o["kind"] == "Deployment"
    }
    api, op = by_component.get("api"), by_component.get("operator")
    if api is None or op is None:
        return [f"want an api and an operator Deployment, got {sorted(by_component)}"]
    for d in (api, op):
        names = [e["name"] for e in d["spec"]["template"]["spec"]["containers"][0].get("env") or []]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            problems.append(f"{kind_name(d)}: duplicate env {sorted(dupes)}")
        if d["spec"]["template"]["spec"].get("automountServiceAccountToken") is not True:
            problems.append(f"{kind_name(d)}: needs its ServiceAccount token")
    for d, command, args in ((api, ["tenantry-api"], ["serve"]), (op, ["tenantry-operator"], ["run"])):
        c = d["spec"]["template"]["spec"]["containers"][0]
        if c.get("command") != command or c.get("args") != args:
            problems.append(f"{kind_name(d)}: runs {c.get('command')} {c.get('args')}, want {command} {args}")
    env = env_of(api)
    tls = values["api"]["tls"]["enabled"]
    want = {
        "TENANTRY_LISTEN": "0.0.0.0:50051",
        "TENANTRY_PROVISIONER": "kubernetes",
        "TENANTRY_MASTER_KEY_FILE": "/etc/tenantry/keys/master.key",
        "TENANTRY_TOKEN_SIGNING_KEY_FILE": "/etc/tenantry/keys/token-signing.key",
        "TENANTRY_DATA_DIR": "/var/lib/tenantry",
        # The Secret the API's Role lets it write (api-namespace-rules).
        "TENANTRY_TOKEN_PUBLIC_KEY_SECRET": values["tokenPublicKeySecret"],
    }
    for k, v in want.items():
        if env.get(k) != v:
            problems.append(f"api env {k}={env.get(k)!r}, want {v!r}")
    url = env.get("TENANTRY_DATABASE_URL") or {}
    if url.get("secretKeyRef") != {"name": values["api"]["database"]["urlSecret"]["name"], "key": values["api"]["database"]["urlSecret"]["key"]}:
        problems.append(f"api env TENANTRY_DATABASE_URL is {url}")
    if tls != ("TENANTRY_TLS_CERT_FILE" in env and "TENANTRY_TLS_KEY_FILE" in env):
        problems.append(f"api TLS env does not follow api.tls.enabled={tls}")
    container = api["spec"]["template"]["spec"]["containers"][0]
    probe = container.get("readinessProbe") or {}
    if tls and "tcpSocket" not in probe:
        problems.append("api readiness must be tcpSocket with TLS on (grpc probes cannot do TLS)")
    if not tls and (probe.get("grpc") or {}).get("port") != 50051:
        problems.append("api readiness must be a grpc probe on 50051 with TLS off")
    keys = [v for v in api["spec"]["template"]["spec"]["volumes"] if v["name"] == "keys"]
    if not keys or keys[0]["secret"].get("defaultMode") != 0o400:
        problems.append("api keys volume must be a Secret with defaultMode 0400")
    mounts = {m["mountPath"]: m for m in container.get("volumeMounts") or []}
    if not mounts.get("/etc/tenantry/keys", {}).get("readOnly"):
        problems.append("api keys must be mounted read-only at /etc/tenantry/keys")
    if "/var/lib/tenantry" not in mounts:
        problems.append("api data dir /var/lib/tenantry must be a writable volume")
    problems += check_mail(api, env, mounts, values)
    problems += check_backup(objs, values)

    portal = by_component.get("portal")
    if values["portal"]["enabled"] != (portal is not None):
        problems.append(f"a portal Deployment must exist exactly when portal.enabled ({values['portal']['enabled']})")
    if portal is not None:
        problems += check_portal(portal, values)

    env = env_of(op)
    if (env.get("POD_NAMESPACE") or {}).get("fieldRef", {}).get("fieldPath") != "metadata.namespace":
        problems.append("operator env POD_NAMESPACE must come from metadata.namespace")
    if (env.get("TENANTRY_IDENTITY") or {}).get("fieldRef", {}).get("fieldPath") != "metadata.name":
        problems.append("operator env TENANTRY_IDENTITY must come from metadata.name")
    if env.get("TENANTRY_LEASE_NAME") != operator_defaults["lease"]:
        problems.append(f"operator lease {env.get('TENANTRY_LEASE_NAME')!r} is not the one the Role names ({operator_defaults['lease']!r})")
    if env.get("TENANTRY_ADMIN_ADDR") != "0.0.0.0:8080":
        problems.append("operator admin address must be 0.0.0.0:8080")
    recipients = values["operator"]["backupRecipients"]
    op_pod = op["spec"]["template"]["spec"]
    op_mounts = {m["mountPath"]: m for m in op_pod["containers"][0].get("volumeMounts") or []}
    file = env.get("TENANTRY_BACKUP_RECIPIENTS_FILE")
    if bool(recipients) != (file is not None):
        problems.append(f"operator TENANTRY_BACKUP_RECIPIENTS_FILE={file!r} does not follow operator.backupRecipients")
    if file:
        mount = op_mounts.get(file.rsplit("/", 1)[0])
        volume = {v["name"]: v for v in op_pod.get("volumes") or []}.get(mount["name"] if mount else "", {})
        cm_name = volume.get("configMap", {}).get("name")
        cms = [o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"] == cm_name]
        got = [l.strip() for l in ((cms[0].get("data") or {}).get(file.rsplit("/", 1)[1], "") if cms else "").splitlines() if l.strip()]
        if not mount or not mount.get("readOnly") or got != recipients:
            problems.append(f"operator backup recipients {got} (mount {mount}), want {recipients} from a read-only ConfigMap")
        egress = [p for p in objs if p["kind"] == "NetworkPolicy" and p["metadata"]["labels"].get("app.kubernetes.io/component") == "operator"]
        if values["networkPolicy"]["enabled"] and not any(
            any(x.get("port") == 8443 for x in r.get("ports") or []) for p in egress for r in p["spec"].get("egress") or []
        ):
            problems.append("with tenant backups the operator must reach the runtimes' port 8443 (it reads their newest backup)")
    known = set(operator_defaults["env"]) | {"POD_NAMESPACE", "RUST_LOG"}
    unknown = set(env) - known
    if unknown:
        problems.append(f"operator env {sorted(unknown)} is read by no flag in operator/src/config.rs")
    return problems


def check_backup(objs: list[dict], values: dict) -> list[str]:
    """The control database's backup CronJob runs `tenantry-api backup` on the database the
    API uses, onto its volume, encrypted to exactly the recipients in the values."""
    b = values["api"]["backup"]
    jobs = [o for o in objs if o["kind"] == "CronJob"]
    if not b["enabled"]:
        return [f"{kind_name(j)} rendered with api.backup.enabled=false" for j in jobs]
    if len(jobs) != 1:
        return [f"want one backup CronJob, got {[kind_name(j) for j in jobs]}"]
    job = jobs[0]
    problems = []
    if job["spec"].get("concurrencyPolicy") != "Forbid":
        problems.append("backup CronJob must not run twice at once (concurrencyPolicy: Forbid)")
    if job["spec"]["schedule"] != b["schedule"]:
        problems.append(f"backup schedule {job['spec']['schedule']!r}, want {b['schedule']!r}")
    pod = pod_template(job)["spec"]
    if pod.get("automountServiceAccountToken") is not False:
        problems.append("backup pods need no Kubernetes API token")
    c = pod["containers"][0]
    args = c.get("args") or []
    if c.get("command") != ["tenantry-api"] or args[:1] != ["backup"]:
        problems.append(f"backup runs {c.get('command')} {args}")
    flags = dict(zip(args[1::2], args[2::2]))
    if flags.get("--keep") != str(b["keep"]):
        problems.append(f"backup --keep {flags.get('--keep')!r}, want {b['keep']}")
    url = {e["name"]: e for e in c.get("env") or []}.get("TENANTRY_DATABASE_URL", {})
    want_ref = {"name": values["api"]["database"]["urlSecret"]["name"], "key": values["api"]["database"]["urlSecret"]["key"]}
    if (url.get("valueFrom") or {}).get("secretKeyRef") != want_ref:
        problems.append(f"backup TENANTRY_DATABASE_URL is {url}, want the API's Secret {want_ref}")
    volumes = {v["name"]: v for v in pod.get("volumes") or []}
    mounts = {m["mountPath"]: m for m in c.get("volumeMounts") or []}
    out = mounts.get(flags.get("--out", ""))
    claim = (volumes.get(out["name"], {}) if out else {}).get("persistentVolumeClaim", {}).get("claimName")
    want_claim = b["persistence"]["existingClaim"] or None
    if not claim or (want_claim and claim != want_claim):
        problems.append(f"backup --out {flags.get('--out')!r} is not the backup volume (claim {claim!r})")
    if not want_claim:
        pvcs = [o for o in objs if o["kind"] == "PersistentVolumeClaim" and o["metadata"]["name"] == claim]
        if len(pvcs) != 1:
            problems.append(f"no PersistentVolumeClaim {claim!r} rendered for the backups")
        elif pvcs[0]["spec"].get("storageClassName", "") != b["persistence"]["storageClassName"]:
            problems.append("the backup claim's StorageClass is not api.backup.persistence.storageClassName")
    recipient_file = flags.get("--recipient-file", "")
    rmount = mounts.get(recipient_file.rsplit("/", 1)[0])
    cm_name = (volumes.get(rmount["name"], {}) if rmount else {}).get("configMap", {}).get("name")
    cms = [o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"] == cm_name]
    if not rmount or not rmount.get("readOnly") or len(cms) != 1:
        problems.append(f"backup --recipient-file {recipient_file!r} is not a read-only mounted ConfigMap")
    else:
        key = recipient_file.rsplit("/", 1)[1]
        got = [l.strip() for l in (cms[0].get("data") or {}).get(key, "").splitlines() if l.strip()]
        if got != b["recipients"]:
            problems.append(f"backup recipients {got}, want {b['recipients']}")
    return problems


def check_mail(api: dict, env: dict, mounts: dict, values: dict) -> list[str]:
    """Mail: with a relay, its settings and the DKIM key (read-only, 0400) from the named
    Secret; without one, no email verification (nobody could receive the link)."""
    problems = []
    mail = values["mail"]
    if not mail["smtpUrl"]:
        if env.get("TENANTRY_REQUIRE_EMAIL_VERIFICATION") != "false":
            problems.append("api without mail.smtpUrl must run with TENANTRY_REQUIRE_EMAIL_VERIFICATION=false")
        if "TENANTRY_SMTP_URL" in env or "/etc/tenantry/mail" in mounts:
            problems.append("api without mail.smtpUrl must not get SMTP settings")
        return problems
    want = {
        "TENANTRY_SMTP_URL": mail["smtpUrl"],
        "TENANTRY_MAIL_FROM": mail["from"],
        "TENANTRY_DKIM_SELECTOR": mail["dkimSelector"],
        "TENANTRY_DKIM_KEY_FILE": "/etc/tenantry/mail/dkim.key",
        "TENANTRY_PUBLIC_URL": mail["publicUrl"],
        "TENANTRY_NOTIFY_DEGRADED_AFTER": mail["notifyDegradedAfter"],
    }
    if "@" in mail["smtpUrl"]:
        want["TENANTRY_SMTP_PASSWORD_FILE"] = "/etc/tenantry/mail/smtp-password"
    for k, v in want.items():
        if env.get(k) != v:
            problems.append(f"api env {k}={env.get(k)!r}, want {v!r}")
    if "TENANTRY_REQUIRE_EMAIL_VERIFICATION" in env:
        problems.append("api with a relay must keep email verification on (the default)")
    if not mounts.get("/etc/tenantry/mail", {}).get("readOnly"):
        problems.append("api mail Secret must be mounted read-only at /etc/tenantry/mail")
    vols = [v for v in api["spec"]["template"]["spec"]["volumes"] if v["name"] == "mail"]
    secret = vols[0].get("secret", {}) if vols else {}
    if secret.get("secretName") != mail["existingSecret"] or secret.get("defaultMode") != 0o400:
        problems.append(f"api mail volume must be Secret {mail['existingSecret']!r} with defaultMode 0400, got {secret}")
    return problems


# Every variable tenantry-portal reads (portal/src/config.rs) besides its log filter.
PORTAL_ENV = {
    "TENANTRY_PORTAL_LISTEN", "TENANTRY_PORTAL_API", "TENANTRY_PORTAL_API_CA_FILE",
    "TENANTRY_PORTAL_COOKIE_KEY_FILE", "TENANTRY_PORTAL_PUBLIC_URL",
    "TENANTRY_PORTAL_TLS_CERT_FILE", "TENANTRY_PORTAL_TLS_KEY_FILE", "TENANTRY_PORTAL_LOG",
}


def check_portal(portal: dict, values: dict) -> list[str]:
    """The portal: no Kubernetes token, the API's address, its cookie key read-only."""
    problems = []
    spec = portal["spec"]["template"]["spec"]
    c = spec["containers"][0]
    if c.get("command") != ["tenantry-portal"] or c.get("args"):
        problems.append(f"{kind_name(portal)}: runs {c.get('command')} {c.get('args')}")
    if spec.get("automountServiceAccountToken") is not False:
        problems.append(f"{kind_name(portal)}: must not mount a ServiceAccount token (it calls only the API)")
    env = env_of(portal)
    names = [e["name"] for e in c.get("env") or []]
    if len(set(names)) != len(names):
        problems.append(f"{kind_name(portal)}: duplicate env")
    unknown = set(env) - PORTAL_ENV
    if unknown:
        problems.append(f"portal env {sorted(unknown)} is read by no flag in portal/src/config.rs")
    tls = values["api"]["tls"]["enabled"]
    api = env.get("TENANTRY_PORTAL_API", "")
    if not api.startswith("https://" if tls else "http://") or not api.endswith(f":{values['api']['service']['port']}"):
        problems.append(f"portal env TENANTRY_PORTAL_API={api!r} does not reach the API Service")
    if tls != ("TENANTRY_PORTAL_API_CA_FILE" in env):
        problems.append("portal needs TENANTRY_PORTAL_API_CA_FILE exactly when api.tls.enabled")
    if env.get("TENANTRY_PORTAL_LISTEN") != "0.0.0.0:8080":
        problems.append("portal must listen on 0.0.0.0:8080")
    key = [v for v in spec["volumes"] if v["name"] == "cookie-key"]
    if not key or key[0]["secret"].get("defaultMode") != 0o400 or key[0]["secret"].get("secretName") != values["portal"]["cookieKey"]["secretName"]:
        problems.append("portal cookie key must be the cookieKey Secret with defaultMode 0400")
    mounts = {m["mountPath"]: m for m in c.get("volumeMounts") or []}
    if not mounts.get("/etc/tenantry/portal", {}).get("readOnly") or env.get("TENANTRY_PORTAL_COOKIE_KEY_FILE") != "/etc/tenantry/portal/cookie.key":
        problems.append("portal cookie key must be mounted read-only and named by TENANTRY_PORTAL_COOKIE_KEY_FILE")
    return problems


def check_network_policies(objs: list[dict]) -> list[str]:
    problems = []
    policies = [o for o in objs if o["kind"] == "NetworkPolicy"]
    pods = [o for o in objs if o["kind"] in ("Deployment", "CronJob")]

    def selects(policy: dict, labels: dict) -> bool:
        sel = policy["spec"]["podSelector"].get("matchLabels") or {}
        return all(labels.get(k) == v for k, v in sel.items())

    deny = [p for p in policies if not p["spec"].get("ingress") and not p["spec"].get("egress") and set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}]
    for d in pods:
        labels = pod_template(d)["metadata"]["labels"]
        if not any(selects(p, labels) for p in deny):
            problems.append(f"{kind_name(d)}: no default-deny policy selects its pods")
        if not any(selects(p, labels) and p["spec"].get("egress") for p in policies):
            problems.append(f"{kind_name(d)}: no policy allows its egress (DNS, API server)")
    for p in policies:
        for rule in p["spec"].get("ingress") or []:
            if not rule.get("from"):
                problems.append(f"{kind_name(p)}: an ingress rule without 'from' admits everyone")
    # The portal reaches DNS and the API's pods, nothing else (no ipBlock, no open port).
    for p in policies:
        if p["metadata"]["labels"].get("app.kubernetes.io/component") != "portal":
            continue
        for rule in p["spec"].get("egress") or []:
            peers = rule.get("to") or []
            ports = {(x.get("port"), x.get("protocol")) for x in rule.get("ports") or []}
            to_api = all((x.get("podSelector") or {}).get("matchLabels", {}).get("app.kubernetes.io/component") == "api" and "namespaceSelector" not in x for x in peers)
            to_dns = all("namespaceSelector" in x and "podSelector" in x for x in peers)
            if not peers or not ((to_api and ports == {(50051, "TCP")}) or (to_dns and ports <= {(53, "UDP"), (53, "TCP")})):
                problems.append(f"{kind_name(p)}: egress {rule} reaches more than DNS and the API")
    return problems


# ---------------------------------------------------------------------------------------
# Facts read from the operator's code


def operator_defaults() -> dict:
    config = (OPERATOR_SRC / "config.rs").read_text()
    names = (KUBE_SRC / "names.rs").read_text()

    def const(name: str) -> str:
        m = re.search(rf'pub const {name}: &str = "([^"]*)";', names)
        if not m:
            raise SystemExit(f"kube/src/names.rs: no constant {name}")
        return m.group(1)

    m = re.search(r'env = "TENANTRY_BLOCKED_EGRESS_CIDRS",.*?default_value = "([^"]*)"', config, re.S)
    if not m:
        raise SystemExit("operator/src/config.rs: no default for TENANTRY_BLOCKED_EGRESS_CIDRS")
    return {
        "blocked": m.group(1).split(","),
        "ca_secret": const("DEFAULT_CA_SECRET"),
        "token_secret": const("TOKEN_KEY_SECRET"),
        "lease": const("DEFAULT_LEASE_NAME"),
        "crd": const("CRD_NAME"),
        "env": re.findall(r'env = "([A-Z_]+)"', config),
    }


def check_defaults(values: dict, defaults: dict, rules: dict[str, list]) -> list[str]:
    problems = []
    op = values["operator"]
    if op["blockedEgressCidrs"] != defaults["blocked"]:
        problems.append(f"operator.blockedEgressCidrs {op['blockedEgressCidrs']} != config.rs {defaults['blocked']}")
    if op["caSecret"] != defaults["ca_secret"]:
        problems.append(f"operator.caSecret {op['caSecret']!r} != names.rs DEFAULT_CA_SECRET {defaults['ca_secret']!r}")
    if values["tokenPublicKeySecret"] != defaults["token_secret"]:
        problems.append(f"tokenPublicKeySecret {values['tokenPublicKeySecret']!r} != names.rs {defaults['token_secret']!r}")
    named = {
        n
        for r in rules["operator-namespace-rules"] + rules["operator-cluster-rules"]
        for n in r.get("resourceNames") or []
    }
    for want in (defaults["lease"], defaults["crd"]):
        if want not in named:
            problems.append(f"no rule names {want!r} (names.rs)")
    return problems


# ---------------------------------------------------------------------------------------
# The RBAC table of docs/security.md


def cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def rbac_table(objs: list[dict], rules: dict[str, list], reasons: dict[str, list[str]], crd_docs: list[dict]) -> tuple[str, list[str]]:
    """The Markdown table of what each program may do, from the rendered chart: program
    (the image of the Deployment that runs as the ServiceAccount), ServiceAccount, the
    bound roles' rules, and each rule's reason from its rule file."""
    problems = []
    cluster_scoped = set(CLUSTER_SCOPED) | {
        (d["spec"]["group"], d["spec"]["names"]["plural"]) for d in crd_docs if d["spec"].get("scope") == "Cluster"
    }
    programs = {}
    for d in (o for o in objs if o["kind"] == "Deployment"):
        spec = d["spec"]["template"]["spec"]
        image = spec["containers"][0]["image"]
        programs[spec.get("serviceAccountName")] = image.split("@")[0].rsplit("/", 1)[-1].split(":")[0]
    roles = {(o["kind"], o["metadata"]["name"]): o for o in objs if o["kind"] in ("ClusterRole", "Role")}
    bindings = sorted(
        (o for o in objs if o["kind"] in ("ClusterRoleBinding", "RoleBinding")),
        key=lambda b: (b["kind"] != "ClusterRoleBinding", b["metadata"]["name"]),
    )
    granted = []
    for b in bindings:
        for s in b.get("subjects") or []:
            if s.get("kind") == "ServiceAccount":
                granted.append((s["name"], b))
    granted.sort(key=lambda g: (programs.get(g[0], ""), g[0]))
    release_prefix = f"{RELEASE}-"

    rows = [
        "| Program (ServiceAccount) | Scope | API group | Resources | Verbs | Why |",
        "|---|---|---|---|---|---|",
    ]
    for account, b in granted:
        ref = b["roleRef"]
        role = roles.get((ref["kind"], ref["name"]))
        if role is None:
            problems.append(f"{kind_name(b)}: roleRef {ref['kind']}/{ref['name']} is not rendered")
            continue
        source = next((name for name in RULE_FILES if rules.get(name) == role.get("rules")), None)
        if source is None:
            problems.append(f"{kind_name(role)}: its rules are none of rbac/*.yaml, so they have no reasons")
            continue
        sa = f"<release>-{account[len(release_prefix):]}" if account.startswith(release_prefix) else account
        program = f"`{programs[account]}` (`{sa}`)" if account in programs else f"no Deployment (`{sa}`)"
        for rule, reason in zip(role["rules"], reasons.get(source) or [""] * len(role["rules"])):
            if b["kind"] == "RoleBinding":
                scope = "release namespace"
            else:
                scopes = {
                    "cluster" if (g, r.split("/")[0]) in cluster_scoped else "every namespace"
                    for g in rule["apiGroups"]
                    for r in rule["resources"]
                }
                scope = " and ".join(sorted(scopes))
            groups = ", ".join(f"`{g}`" if g else "core" for g in rule["apiGroups"])
            resources = ", ".join(f"`{r}`" for r in rule["resources"])
            if rule.get("resourceNames"):
                resources += " named " + ", ".join(f"`{n}`" for n in rule["resourceNames"])
            verbs = ", ".join(rule["verbs"])
            rows.append(f"| {program} | {scope} | {groups} | {resources} | {verbs} | {cell(reason) or '**no reason given**'} |")
    return "\n".join(rows) + "\n", problems


def chart_rbac_table(helm: Any, yaml: Any) -> tuple[str, list[str]]:
    """The table for release "tenantry" in "tenantry-system" with ci/values-minimal.yaml,
    and the problems met making it (a rule without a reason among them)."""
    with helm.Chart.load(str(CHART)) as chart:
        crd_docs = [d for c in chart.crds for d in yaml.safe_load_all(c["data"]) if d]
    values = helm.values_from_yaml((CI_VALUES / "values-minimal.yaml").read_text())
    objs = [o for _, o in objects_of(yaml, render(helm, values, RELEASE, NAMESPACE))]
    rules = load_rule_files(yaml)
    reasons, problems = load_reasons(rules)
    table, table_problems = rbac_table(objs, rules, reasons, crd_docs)
    return table, problems + table_problems


def split_doc(text: str) -> tuple[str, str, str] | None:
    """docs/security.md as (before and including the begin marker, the table, the end
    marker and after), or None when the markers are missing or out of order."""
    lines = text.splitlines(keepends=True)
    begins = [i for i, line in enumerate(lines) if line.strip() == TABLE_BEGIN]
    ends = [i for i, line in enumerate(lines) if line.strip() == TABLE_END]
    if len(begins) != 1 or len(ends) != 1 or begins[0] > ends[0]:
        return None
    b, e = begins[0], ends[0]
    return "".join(lines[: b + 1]), "".join(lines[b + 1 : e]), "".join(lines[e:])


def check_doc_table(table: str) -> list[str]:
    doc = SECURITY_DOC.relative_to(ROOT)
    parts = split_doc(SECURITY_DOC.read_text())
    if parts is None:
        return [f"{doc} needs exactly one line {TABLE_BEGIN} followed by one line {TABLE_END}; then run: {REGENERATE}"]
    have, want = parts[1].strip().splitlines(), table.strip().splitlines()
    if have == want:
        return []
    at = next((i for i, (h, w) in enumerate(zip(have, want)) if h != w), min(len(have), len(want)))
    return [
        f"{doc}: the RBAC table differs from charts/tenantry/rbac/*.yaml as the chart renders them "
        f"(first at table line {at + 1}); regenerate it with: {REGENERATE}",
        f"  in the doc:  {have[at] if at < len(have) else '(nothing)'}",
        f"  generated:   {want[at] if at < len(want) else '(nothing)'}",
    ]


def table_mode(write: bool) -> int:
    try:
        import helm_python as helm
        import yaml
    except ImportError as e:
        print(f"chart_check: {e}; install: python3 -m pip install {' '.join(REQUIREMENTS)}", file=sys.stderr)
        return 1
    table, problems = chart_rbac_table(helm, yaml)
    if problems:
        print("chart_check: cannot make the RBAC table:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    if not write:
        print(table, end="")
        return 0
    text = SECURITY_DOC.read_text()
    parts = split_doc(text)
    if parts is None:
        print(f"chart_check: {SECURITY_DOC}: add one line {TABLE_BEGIN} and, below it, one line {TABLE_END} where the table goes", file=sys.stderr)
        return 1
    updated = parts[0] + table + parts[2]
    if updated == text:
        print(f"{SECURITY_DOC.relative_to(ROOT)}: the RBAC table is up to date")
    else:
        SECURITY_DOC.write_text(updated)
        print(f"{SECURITY_DOC.relative_to(ROOT)}: wrote the RBAC table ({len(table.splitlines()) - 2} rules)")
    return 0


# ---------------------------------------------------------------------------------------


RBAC_KINDS = {"ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"}


def render_rbac(namespace: str) -> int:
    try:
        import helm_python as helm
        import yaml
    except ImportError as e:
        print(f"chart_check: {e}; install: python3 -m pip install {' '.join(REQUIREMENTS)}", file=sys.stderr)
        return 1
    values = helm.values_from_yaml((CI_VALUES / "values-minimal.yaml").read_text())
    objs = [obj for _, obj in objects_of(yaml, render(helm, values, RELEASE, namespace))]
    print(yaml.safe_dump_all([o for o in objs if o.get("kind") in RBAC_KINDS], sort_keys=False))
    return 0


def main() -> int:
    if sys.argv[1:] == ["--requirements"]:
        print("\n".join(REQUIREMENTS))
        return 0
    if len(sys.argv) == 3 and sys.argv[1] == "--render-rbac":
        return render_rbac(sys.argv[2])
    if sys.argv[1:] in (["--rbac-table"], ["--write-rbac-table"]):
        return table_mode(write=sys.argv[1] == "--write-rbac-table")
    if sys.argv[1:]:
        print(__doc__)
        return 2

    started = time.monotonic()
    try:
        import helm_python as helm
        import kubernetes_validate
        import kubernetes_validate.utils as kv
        import yaml
    except ImportError as e:
        print(f"chart_check: {e}; install: python3 -m pip install {' '.join(REQUIREMENTS)}")
        return 1

    report = Report()
    available = kv.all_versions()
    target = KUBERNETES_VERSION
    if not any(kv.major_minor(v) == kv.major_minor(KUBERNETES_VERSION) for v in available):
        target = available[-1]
        print(f"NOTE: kubernetes-validate has no {KUBERNETES_VERSION} schemas; using the newest, {target}")
    print(
        f"helm-python-sdk {helm.__version__} (Helm SDK {helm.helm_sdk_version()}, libhelm_c {helm.helm_c_version()}), "
        f"kubernetes-validate {kubernetes_validate.__version__} (Kubernetes {target} schemas, strict)"
    )

    with helm.Chart.load(str(CHART)) as chart:
        defaults = chart.values
        crd_docs = [d for c in chart.crds for d in yaml.safe_load_all(c["data"]) if d]
        meta = chart.metadata
    if (meta.get("name"), meta.get("version"), meta.get("appVersion"), meta.get("apiVersion")) != ("tenantry", "0.1.0", "0.1.0", "v2"):
        report.fail("Chart.yaml", f"name/version/appVersion/apiVersion are {meta}")

    def load_values(name: str) -> dict:
        return helm.values_from_yaml((CI_VALUES / name).read_text())

    rules = load_rule_files(yaml)
    op_defaults = operator_defaults()

    print("\n== rule files and defaults")
    report.check("rbac/*.yaml are well-formed least-privilege PolicyRules", check_rule_files(rules))
    report.check("every rule in rbac/*.yaml has a `# why:` reason directly above it", load_reasons(rules)[1])
    report.check("defaults match operator/src/config.rs and kube/src/names.rs", check_defaults(defaults, op_defaults, rules))

    def validate(what: str, obj: dict) -> None:
        try:
            got = kv.validate(obj, target, strict=True)
        except kv.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            report.fail(f"{what}: schema {kind_name(obj)}", f"{path}: {e.message}")
            return
        except (kv.SchemaNotFoundError, kv.InvalidSchemaError, kv.VersionNotSupportedError) as e:
            report.fail(f"{what}: schema {kind_name(obj)}", getattr(e, "message", str(e)))
            return
        report.ok(f"{what}: {kind_name(obj)} valid against Kubernetes {got} (strict)")

    print("\n== CRD")
    if [d.get("metadata", {}).get("name") for d in crd_docs] != [op_defaults["crd"]]:
        report.fail("crds/", f"want exactly the CRD {op_defaults['crd']}, got {[kind_name(d) for d in crd_docs]}")
    for doc in crd_docs:
        validate("crds/tenants.tenantry.dev.yaml", doc)

    # Good values: each must render, lint strictly, validate, and pass the policy checks.
    good = [
        ("values-minimal.yaml", RELEASE, NAMESPACE),
        ("values-full.yaml", "prod", "platform"),
        ("values-no-networkpolicy.yaml", RELEASE, NAMESPACE),
    ]
    for name, release, namespace in good:
        values = load_values(name)
        what = f"ci/{name}"
        print(f"\n== {what} (release {release}, namespace {namespace})")
        findings = lint(helm, values, namespace)
        report.check(f"{what}: helm lint --strict", findings)
        try:
            manifests = render(helm, values, release, namespace)
        except helm.HelmError as e:
            report.fail(f"{what}: render", first_lines(e, 10))
            continue
        objs = [o for _, o in objects_of(yaml, manifests)]
        kinds = sorted(kind_name(o) for o in objs)
        report.ok(f"{what}: rendered {len(objs)} objects")
        if not manifests.get("tenantry/templates/NOTES.txt", "").strip():
            report.fail(f"{what}: NOTES.txt", "renders empty")
        for obj in objs:
            validate(what, obj)
        merged = deep_merge(defaults, values)
        report.check(f"{what}: every object carries the app.kubernetes.io labels", [p for o in objs for p in check_labels(o)])
        report.check(f"{what}: every pod template meets Pod Security restricted", [p for o in objs for p in check_restricted(o)])
        report.check(f"{what}: roles hold exactly rbac/*.yaml; bindings and accounts line up", check_rbac(objs, rules, merged))
        report.check(f"{what}: Deployments give the programs what they read", check_programs(objs, merged, op_defaults))
        policies = [o for o in objs if o["kind"] == "NetworkPolicy"]
        if merged["networkPolicy"]["enabled"]:
            report.check(f"{what}: NetworkPolicies default-deny and allow egress", check_network_policies(objs))
        elif policies:
            report.fail(f"{what}: networkPolicy.enabled=false", f"still renders {[kind_name(p) for p in policies]}")
        names = [(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in objs]
        if len(set(names)) != len(names):
            report.fail(f"{what}: object names", f"duplicates in {kinds}")

    print("\n== RBAC table in docs/security.md")
    try:
        table, problems = chart_rbac_table(helm, yaml)
    except helm.HelmError as e:
        report.fail("RBAC table: render", first_lines(e, 10))
    else:
        # A rule without a reason is already reported above; here only the table counts.
        report.check(
            f"docs/security.md's RBAC table is what `{REGENERATE}` writes",
            [p for p in problems if "# why:" not in p] + check_doc_table(table),
        )

    # Bad values: each must be refused by render (= install) and by lint, naming the key.
    print("\n== bad values are refused")
    minimal = load_values("values-minimal.yaml")
    bad: list[tuple[str, dict, str]] = [
        ("defaults only (no Secrets named)", {}, "/api/database/urlSecret/name"),
        ("empty api.database.urlSecret.name", set_path(minimal, "api.database.urlSecret.name", ""), "/api/database/urlSecret/name"),
        ("empty api.keys.secretName", set_path(minimal, "api.keys.secretName", ""), "/api/keys/secretName"),
        ("api.replicas is a string", set_path(minimal, "api.replicas", "two"), "/api/replicas"),
        ("networkPolicy.enabled is a string", set_path(minimal, "networkPolicy.enabled", "yes"), "/networkPolicy/enabled"),
        ("unknown key api.replica", set_path(minimal, "api.replica", 3), "replica"),
        ("unknown top-level key", set_path(minimal, "operatorr", {}), "operatorr"),
        ("bad duration api.sessionIdleTimeout=30 minutes", set_path(minimal, "api.sessionIdleTimeout", "30 minutes"), "/api/sessionIdleTimeout"),
        ("api.instanceTokenTtl above 15m", set_path(minimal, "api.instanceTokenTtl", "16m"), "/api/instanceTokenTtl"),
        ("api.maxGrantDays of 0", set_path(minimal, "api.maxGrantDays", 0), "/api/maxGrantDays"),
        ("api.accessReviewInterval not a duration", set_path(minimal, "api.accessReviewInterval", "quarterly"), "/api/accessReviewInterval"),
        ("api.tls.enabled without a secretName", set_path(minimal, "api.tls.enabled", True), "/api/tls/secretName"),
        ("image.pullPolicy not an enum value", set_path(minimal, "image.pullPolicy", "Sometimes"), "/image/pullPolicy"),
        ("bad CIDR in operator.blockedEgressCidrs", set_path(minimal, "operator.blockedEgressCidrs", ["10.0.0.0"]), "/operator/blockedEgressCidrs"),
        ("upper-case Secret name", set_path(minimal, "api.keys.secretName", "Tenantry_Keys"), "/api/keys/secretName"),
        ("portal enabled without a cookie key", set_path(minimal, "portal.cookieKey.secretName", ""), "/portal/cookieKey/secretName"),
        ("bad CIDR in api.trustedProxies", set_path(minimal, "api.trustedProxies", ["10.0.0.1"]), "/api/trustedProxies"),
        ("portal.publicUrl without a scheme", set_path(minimal, "portal.publicUrl", "signup.example.com"), "/portal/publicUrl"),
        ("mail.smtpUrl with a password in it", set_path(minimal, "mail.smtpUrl", "smtp://tenantry:hunter2@relay.example.net"), "/mail/smtpUrl"),
        ("mail.smtpUrl without TLS", set_path(minimal, "mail.smtpUrl", "http://relay.example.net"), "/mail/smtpUrl"),
        ("api.backup enabled without recipients", set_path(minimal, "api.backup.enabled", True), "/api/backup/recipients"),
        ("api.backup.recipients holds a private key", set_path(set_path(minimal, "api.backup.enabled", True), "api.backup.recipients", ["AGE-SECRET-KEY-1QQQQ"]), "/api/backup/recipients/0"),
        ("api.backup.keep is 0", set_path(minimal, "api.backup.keep", 0), "/api/backup/keep"),
        ("operator.backupRecipients holds a private key", set_path(minimal, "operator.backupRecipients", ["AGE-SECRET-KEY-1QQQQ"]), "/operator/backupRecipients/0"),
    ]
    for what, values, needle in bad:
        try:
            render(helm, values, RELEASE, NAMESPACE)
        except helm.HelmError as e:
            message = str(e)
            if needle in message:
                reasons = [l.strip() for l in message.splitlines() if l.strip().startswith("- at ")]
                report.ok(f"refused: {what} -> {reasons[-1] if reasons else first_lines(message, 2)}")
            else:
                report.fail(f"refused: {what}", f"for another reason than {needle!r}: {first_lines(message, 6)}")
        else:
            report.fail(f"refused: {what}", "rendered without error")
            continue
        if not lint(helm, values, NAMESPACE):
            report.fail(f"refused by lint: {what}", "helm lint --strict passed")

    # Without the schema (a copy of the chart without values.schema.json), the templates'
    # `required` still stops the render with a clear message.
    with tempfile.TemporaryDirectory() as tmp:
        copy_dir = Path(tmp) / "tenantry"
        shutil.copytree(CHART, copy_dir)
        (copy_dir / "values.schema.json").unlink()
        try:
            with helm.Chart.load(str(copy_dir)) as unchecked:
                unchecked.render({}, name=RELEASE, namespace=NAMESPACE, is_install=True)
        except helm.HelmError as e:
            if "api.database.urlSecret.name is required" in str(e):
                report.ok(f"refused without the schema: {first_lines(str(e).split('error calling required: ')[-1], 1)}")
            else:
                report.fail("refused without the schema", f"for another reason: {first_lines(e, 4)}")
        else:
            report.fail("refused without the schema", "rendered without error: `required` is missing")

    elapsed = time.monotonic() - started
    print(f"\nchart checks: {report.passed} passed, {len(report.failures)} failed ({elapsed:.1f}s)")
    if report.failures:
        print("\nFAILED:")
        for f in report.failures:
            print(f"  - {first_lines(f, 3)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

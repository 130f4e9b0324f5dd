#!/usr/bin/env python3
"""Validates every Kubernetes manifest under deploy/ (run by tests/tests/deploy.rs).

    python3 tests/deploy/validate.py deploy/ [--kubernetes-version 1.30 ...]

For every YAML document of every *.yaml / *.yml / *.json file, recursively:

1. Built-in kinds (Namespace, DaemonSet, ClusterRole, CustomResourceDefinition, ...) are
   validated with kubernetes-validate (PyPI) in strict mode (unknown fields are errors, as
   with kubectl's default server-side field validation) against the OpenAPI schemas of each
   Kubernetes version asked for (default: the oldest sluice supports, 1.30, and the newest
   kubernetes-validate ships).
2. CustomResourceDefinitions are also checked for what the API server demands beyond their
   schema: a structural openAPIV3Schema, metadata.name = <plural>.<group>, exactly one
   storage version, printer columns.
3. Custom resources (TrafficPolicy, AuthorizationPolicy, HTTPRoute, ...) are validated with
   jsonschema against the openAPIV3Schema of their CRD: a CRD found in deploy/ (the Istio kinds
   sluice reads have theirs in deploy/optional/), or, for the Gateway API routes, the stand-in
   schema in tests/deploy/schemas/ (the Gateway API's own CRDs are not shipped). Unknown fields are errors (kubectl's strict field validation). CEL
   rules (x-kubernetes-validations) are not evaluated; their count is reported.
4. A document of a kind with no schema anywhere is an error: nothing passes unvalidated.
5. Cross-references between the manifests: namespaces exist, Services select pods and name
   existing container ports, routes and policies point at existing Services, ports and pods,
   ServiceAccounts and ConfigMap keys exist, $(VAR) in container args is defined.

Exits 0 when everything passed, 1 with every error listed otherwise, 2 when a tool is
missing.
"""

import argparse
import copy
import functools
import os
import re
import sys

try:
    import jsonschema
    import yaml
    from kubernetes_validate import utils as kv
    from referencing import Registry, Resource
except ImportError as e:  # pragma: no cover - the message is the point
    print(f"FATAL missing Python package ({e}); install them with:\n"
          "  python3 -m pip install kubernetes-validate==1.37.0 jsonschema", file=sys.stderr)
    sys.exit(2)

HERE = os.path.dirname(os.path.abspath(__file__))
# Stand-in schemas for kinds whose CRDs are not shipped in deploy/; a CRD in deploy/ wins.
STAND_INS = [os.path.join(HERE, "schemas", f) for f in ("gateway-api-routes-subset.yaml",)]
OLDEST_SUPPORTED = "1.30"

DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


# ---------------------------------------------------------------------------------------------
# Loading


class UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that rejects duplicate keys (PyYAML keeps the last one silently; kubectl's
    strict decoding refuses them)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


class Doc:
    def __init__(self, path, index, body):
        self.path, self.index, self.body = path, index, body

    @property
    def api_version(self):
        return self.body.get("apiVersion", "")

    @property
    def group(self):
        return self.api_version.rpartition("/")[0]

    @property
    def version(self):
        return self.api_version.rpartition("/")[2]

    @property
    def kind(self):
        return self.body.get("kind", "")

    @property
    def meta(self):
        m = self.body.get("metadata")
        return m if isinstance(m, dict) else {}

    @property
    def name(self):
        return self.meta.get("name", "")

    @property
    def namespace(self):
        return self.meta.get("namespace")

    def where(self):
        return f"{self.path} (document {self.index + 1}, {self.kind or '?'}/{self.name or '?'})"


def load_docs(root, errors):
    docs, files = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for f in sorted(filenames):
            if f.endswith((".yaml", ".yml", ".json")):
                files.append(os.path.join(dirpath, f))
    for path in files:
        rel = os.path.relpath(path, os.path.dirname(os.path.abspath(root)))
        try:
            with open(path) as fh:
                bodies = list(yaml.load_all(fh, Loader=UniqueKeyLoader))
        except yaml.YAMLError as e:
            errors.append(f"{rel}: not valid YAML: {e}")
            continue
        n = 0
        for i, body in enumerate(bodies):
            if body is None:
                continue
            n += 1
            d = Doc(rel, i, body)
            if not isinstance(body, dict):
                errors.append(f"{d.where()}: a document must be a mapping")
                continue
            for field in ("apiVersion", "kind"):
                if not isinstance(body.get(field), str) or not body.get(field):
                    errors.append(f"{d.where()}: missing {field}")
            if not d.name:
                errors.append(f"{d.where()}: missing metadata.name")
            docs.append(d)
        if n == 0:
            errors.append(f"{rel}: holds no Kubernetes object")
    return docs, files


# ---------------------------------------------------------------------------------------------
# Built-in kinds: kubernetes-validate's bundled schemas (strict), all errors listed


@functools.lru_cache(maxsize=None)
def schema_file(version, name):
    return kv.schema_contents(f"kubernetes-json-schema/v{version}-local-strict/{name}", version)


@functools.lru_cache(maxsize=None)
def builtin_validator(version, kind, api_version):
    """A validator for a built-in kind at a Kubernetes version, or None if it has no schema."""
    group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    try:
        schema = schema_file(version, f"{kind.lower()}-{group_version}.json")
    except FileNotFoundError:
        return None
    registry = Resource.from_contents(schema) @ Registry()
    registry = Resource.from_contents(schema_file(version, "_definitions.json")) @ registry
    return jsonschema.validators.Draft202012Validator(schema, registry=registry)


def full_version(major_minor):
    """'1.30' -> '1.30.0', the directory name kubernetes-validate uses."""
    for v in kv.all_versions():
        if kv.major_minor(v) == major_minor:
            return v
    raise SystemExit(f"FATAL kubernetes-validate {kv.__version__ if hasattr(kv, '__version__') else ''}"
                     f" has no schemas for Kubernetes {major_minor}; it has {', '.join(kv.all_versions())}")


def error_text(e):
    path = ".".join(str(p) for p in e.absolute_path) or "(top level)"
    return f"{path}: {e.message}"


# ---------------------------------------------------------------------------------------------
# CRDs: structural checks and conversion of openAPIV3Schema to JSON Schema


def structural_errors(schema, path="openAPIV3Schema", in_value_validation=False):
    """The structural-schema rules of apiextensions.k8s.io/v1 that a hand-written schema most
    often breaks."""
    errs = []
    if not isinstance(schema, dict):
        return [f"{path}: a schema must be a mapping"]
    int_or_string = schema.get("x-kubernetes-int-or-string") is True
    preserve = schema.get("x-kubernetes-preserve-unknown-fields") is True
    if not in_value_validation and not schema.get("type") and not int_or_string and not preserve:
        errs.append(f"{path}: type must be set (structural schema)")
    if "properties" in schema and "additionalProperties" in schema:
        errs.append(f"{path}: properties and additionalProperties are mutually exclusive")
    if "items" in schema and not isinstance(schema["items"], dict):
        errs.append(f"{path}.items: must be one schema, not a list")
    if schema.get("type") == "array" and "items" not in schema and not preserve:
        errs.append(f"{path}: an array must define items")
    for key in ("$ref", "definitions", "dependencies", "id", "patternProperties", "additionalItems"):
        if key in schema:
            errs.append(f"{path}: {key} is not allowed in a CRD schema")
    for name, sub in (schema.get("properties") or {}).items():
        errs += structural_errors(sub, f"{path}.properties.{name}", in_value_validation)
    if isinstance(schema.get("items"), dict):
        errs += structural_errors(schema["items"], f"{path}.items", in_value_validation)
    if isinstance(schema.get("additionalProperties"), dict):
        errs += structural_errors(schema["additionalProperties"], f"{path}.additionalProperties", in_value_validation)
    for key in ("allOf", "anyOf", "oneOf"):
        for i, sub in enumerate(schema.get(key) or []):
            errs += structural_errors(sub, f"{path}.{key}[{i}]", True)
    if isinstance(schema.get("not"), dict):
        errs += structural_errors(schema["not"], f"{path}.not", True)
    for p in schema.get("x-kubernetes-list-map-keys") or []:
        if p not in ((schema.get("items") or {}).get("properties") or {}):
            errs.append(f"{path}: list map key {p!r} is not a property of the items")
    return errs


def count_cel(schema):
    if not isinstance(schema, dict):
        return 0
    n = len(schema.get("x-kubernetes-validations") or [])
    for v in schema.values():
        if isinstance(v, dict):
            n += count_cel(v)
        elif isinstance(v, list):
            n += sum(count_cel(x) for x in v)
    return n


def to_json_schema(s):
    """OpenAPI v3 (Kubernetes flavour) -> JSON Schema, with the API server's semantics: unknown
    fields are rejected unless x-kubernetes-preserve-unknown-fields, nullable allows null,
    int-or-string allows both."""
    if not isinstance(s, dict):
        return s
    out = {}
    for k, v in s.items():
        if k in ("properties",):
            out[k] = {name: to_json_schema(sub) for name, sub in v.items()}
        elif k in ("items", "not"):
            out[k] = to_json_schema(v)
        elif k == "additionalProperties":
            out[k] = to_json_schema(v) if isinstance(v, dict) else v
        elif k in ("allOf", "anyOf", "oneOf"):
            out[k] = [to_json_schema(x) for x in v]
        elif k in ("type", "enum", "required", "minimum", "maximum", "minLength", "maxLength",
                   "pattern", "minItems", "maxItems", "uniqueItems", "minProperties",
                   "maxProperties", "multipleOf"):
            out[k] = copy.deepcopy(v)
        elif k == "exclusiveMinimum" and v is True:
            out[k] = s["minimum"]
            out.pop("minimum", None)
        elif k == "exclusiveMaximum" and v is True:
            out[k] = s["maximum"]
            out.pop("maximum", None)
        # description, default, format, example, x-kubernetes-* (other than those below): no
        # constraint to check here.
    if "exclusiveMinimum" in out:
        out.pop("minimum", None)
    if "exclusiveMaximum" in out:
        out.pop("maximum", None)
    if s.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if s.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if (s.get("type") == "object" and "properties" in s and "additionalProperties" not in s
            and not s.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    if s.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True
    return out


# What an object's metadata may hold in a manifest, for custom resources (built-in kinds get
# the full ObjectMeta check from kubernetes-validate).
METADATA_SCHEMA = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "maxLength": 253, "pattern": DNS_SUBDOMAIN.pattern},
        "namespace": {"type": "string", "maxLength": 63, "pattern": DNS_LABEL.pattern},
        "labels": {"type": "object", "additionalProperties": {"type": "string", "maxLength": 63}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
    "additionalProperties": False,
}


class CustomKind:
    def __init__(self, group, kind, scope, versions, source, stand_in=False):
        self.group, self.kind, self.scope, self.source, self.stand_in = group, kind, scope, source, stand_in
        # version -> (validator, CEL rule count)
        self.versions = {}
        for name, schema in versions.items():
            js = to_json_schema(schema)
            js.setdefault("properties", {})["metadata"] = METADATA_SCHEMA
            jsonschema.Draft7Validator.check_schema(js)
            self.versions[name] = (jsonschema.Draft7Validator(js), count_cel(schema))


def crd_errors(d):
    """API-server checks of a CRD beyond its own schema."""
    errs = []
    spec = d.body.get("spec") or {}
    names = spec.get("names") or {}
    group, plural = spec.get("group", ""), names.get("plural", "")
    if d.name != f"{plural}.{group}":
        errs.append(f"metadata.name must be <spec.names.plural>.<spec.group> = {plural}.{group}")
    versions = spec.get("versions") or []
    if sum(1 for v in versions if v.get("storage")) != 1:
        errs.append("exactly one version must have storage: true")
    if not any(v.get("served") for v in versions):
        errs.append("no version is served")
    for v in versions:
        schema = ((v.get("schema") or {}).get("openAPIV3Schema"))
        where = f"spec.versions[{v.get('name')}]"
        if not isinstance(schema, dict):
            errs.append(f"{where}: no openAPIV3Schema")
            continue
        errs += [f"{where}.schema.{e}" for e in structural_errors(schema)]
        meta = (schema.get("properties") or {}).get("metadata")
        if meta is not None and set(meta) - {"type", "properties"}:
            errs.append(f"{where}: metadata may only be restricted in name and generateName")
        for c in v.get("additionalPrinterColumns") or []:
            if not str(c.get("jsonPath", "")).startswith("."):
                errs.append(f"{where}: printer column {c.get('name')}: jsonPath must start with '.'")
        try:
            jsonschema.Draft7Validator.check_schema(to_json_schema(schema))
        except jsonschema.SchemaError as e:
            errs.append(f"{where}: the schema is not a valid schema: {e.message}")
    return errs


def custom_kinds(docs, errors):
    kinds = {}
    for d in docs:
        if d.kind != "CustomResourceDefinition" or d.api_version != "apiextensions.k8s.io/v1":
            continue
        spec = d.body.get("spec") or {}
        versions = {v.get("name"): (v.get("schema") or {}).get("openAPIV3Schema") or {}
                    for v in spec.get("versions") or [] if v.get("served")}
        key = (spec.get("group"), (spec.get("names") or {}).get("kind"))
        try:
            kinds[key] = CustomKind(key[0], key[1], spec.get("scope"), versions, d.where())
        except jsonschema.SchemaError as e:
            errors.append(f"{d.where()}: openAPIV3Schema does not compile: {e.message}")
    for stand_ins in STAND_INS:
        with open(stand_ins) as fh:
            for entry in yaml.safe_load(fh):
                key = (entry["group"], entry["kind"])
                if key not in kinds:
                    kinds[key] = CustomKind(entry["group"], entry["kind"], entry["scope"],
                                            {v: entry["openAPIV3Schema"] for v in entry["versions"]},
                                            os.path.relpath(stand_ins, os.path.join(HERE, "..", "..")),
                                            stand_in=True)
    return kinds


# ---------------------------------------------------------------------------------------------
# Cross-references between the manifests


def pod_templates(docs):
    """(doc, namespace, pod labels, pod spec) of every workload."""
    out = []
    for d in docs:
        if d.kind in ("Deployment", "DaemonSet", "StatefulSet", "ReplicaSet", "Job"):
            tpl = (d.body.get("spec") or {}).get("template") or {}
            out.append((d, d.namespace, (tpl.get("metadata") or {}).get("labels") or {}, tpl.get("spec") or {}))
        elif d.kind == "Pod":
            out.append((d, d.namespace, d.meta.get("labels") or {}, d.body.get("spec") or {}))
    return out


def selects(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def cross_reference_errors(docs):
    errs = []
    by = {}
    for d in docs:
        by.setdefault((d.kind, d.namespace, d.name), d)
    namespaces = {d.name for d in docs if d.kind == "Namespace"}
    workloads = pod_templates(docs)

    def service(ns, name):
        return by.get(("Service", ns, name))

    def port_names(svc):
        return {p.get("name") for p in (svc.body.get("spec") or {}).get("ports") or []}

    def port_numbers(svc):
        return {p.get("port") for p in (svc.body.get("spec") or {}).get("ports") or []}

    for d in docs:
        cluster_scoped = d.kind in ("Namespace", "ClusterRole", "ClusterRoleBinding",
                                    "CustomResourceDefinition", "PriorityClass",
                                    "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding")
        if not cluster_scoped:
            if not d.namespace:
                errs.append(f"{d.where()}: no metadata.namespace (every namespaced object names its namespace)")
            elif d.namespace not in namespaces:
                errs.append(f"{d.where()}: namespace {d.namespace!r} is not defined in deploy/")

    for (d, ns, labels, spec) in workloads:
        sa = spec.get("serviceAccountName")
        if sa and ("ServiceAccount", ns, sa) not in by:
            errs.append(f"{d.where()}: serviceAccountName {sa!r} is not defined in namespace {ns}")
        for c in (spec.get("initContainers") or []) + (spec.get("containers") or []):
            env = {e.get("name") for e in c.get("env") or []}
            for arg in (c.get("command") or []) + (c.get("args") or []):
                for var in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", str(arg)):
                    if var not in env:
                        errs.append(f"{d.where()}: container {c.get('name')}: $({var}) is not in its env")
            for e in c.get("env") or []:
                ref = ((e.get("valueFrom") or {}).get("configMapKeyRef")) or None
                if ref:
                    cm = by.get(("ConfigMap", ns, ref.get("name")))
                    if cm is None:
                        errs.append(f"{d.where()}: env {e.get('name')}: ConfigMap {ref.get('name')!r} is not defined")
                    elif ref.get("key") not in (cm.body.get("data") or {}):
                        errs.append(f"{d.where()}: env {e.get('name')}: ConfigMap {ref.get('name')} has no key {ref.get('key')!r}")

    for d in docs:
        if d.kind == "ClusterRoleBinding" or d.kind == "RoleBinding":
            for s in d.body.get("subjects") or []:
                if s.get("kind") == "ServiceAccount" and ("ServiceAccount", s.get("namespace"), s.get("name")) not in by:
                    errs.append(f"{d.where()}: subject ServiceAccount {s.get('namespace')}/{s.get('name')} is not defined")
            ref = d.body.get("roleRef") or {}
            if ref.get("kind") == "ClusterRole" and ("ClusterRole", None, ref.get("name")) not in by:
                errs.append(f"{d.where()}: ClusterRole {ref.get('name')!r} is not defined")

        if d.kind == "Service":
            spec = d.body.get("spec") or {}
            sel = spec.get("selector") or {}
            pods = [(w, s) for (w, ns, labels, s) in workloads if ns == d.namespace and selects(sel, labels)]
            if not pods:
                errs.append(f"{d.where()}: selector {sel} matches no pod template in namespace {d.namespace}")
            for p in spec.get("ports") or []:
                tp = p.get("targetPort")
                if isinstance(tp, str):
                    for (w, s) in pods:
                        names = {cp.get("name") for c in s.get("containers") or [] for cp in c.get("ports") or []}
                        if tp not in names:
                            errs.append(f"{d.where()}: targetPort {tp!r} is not a container port of {w.kind}/{w.name}")

        if d.kind in ("HTTPRoute", "GRPCRoute"):
            spec = d.body.get("spec") or {}
            for ref in spec.get("parentRefs") or []:
                if ref.get("kind") == "Service":
                    svc = service(ref.get("namespace", d.namespace), ref.get("name"))
                    if ref.get("group", "gateway.networking.k8s.io") != "":
                        errs.append(f"{d.where()}: a Service parentRef needs group \"\" (GAMMA)")
                    if svc is None:
                        errs.append(f"{d.where()}: parentRef Service {ref.get('name')!r} is not defined")
                    elif "port" in ref and ref["port"] not in port_numbers(svc):
                        errs.append(f"{d.where()}: parentRef port {ref['port']} is not a port of Service {ref.get('name')}")
            for rule in spec.get("rules") or []:
                for b in rule.get("backendRefs") or []:
                    if b.get("kind", "Service") != "Service":
                        continue
                    svc = service(b.get("namespace", d.namespace), b.get("name"))
                    if svc is None:
                        errs.append(f"{d.where()}: backendRef Service {b.get('name')!r} is not defined")
                    elif b.get("port") not in port_numbers(svc):
                        errs.append(f"{d.where()}: backendRef {b.get('name')} port {b.get('port')} is not a port of that Service")

        if d.kind == "TrafficPolicy":
            for ref in (d.body.get("spec") or {}).get("targetRefs") or []:
                svc = service(d.namespace, ref.get("name"))
                if svc is None:
                    errs.append(f"{d.where()}: targetRef Service {ref.get('name')!r} is not defined")
                elif ref.get("sectionName") and ref["sectionName"] not in port_names(svc):
                    errs.append(f"{d.where()}: sectionName {ref['sectionName']!r} is not a port name of Service {ref.get('name')}")

        if d.kind == "AuthorizationPolicy":
            spec = d.body.get("spec") or {}
            sel = (spec.get("selector") or {}).get("matchLabels")
            if sel and not any(ns == d.namespace and selects(sel, labels) for (_, ns, labels, _) in workloads):
                errs.append(f"{d.where()}: selector {sel} matches no pod template in namespace {d.namespace}")
            for rule in spec.get("rules") or []:
                for f in rule.get("from") or []:
                    for p in ((f.get("source") or {}).get("principals") or []):
                        m = re.fullmatch(r"[^/]+/ns/([^/]+)/sa/([^/]+)", p)
                        if p.startswith("spiffe://") or not m:
                            errs.append(f"{d.where()}: principal {p!r} is not <trust-domain>/ns/<ns>/sa/<sa>")
                        elif m.group(1) in namespaces and ("ServiceAccount", m.group(1), m.group(2)) not in by:
                            errs.append(f"{d.where()}: principal {p!r} names a ServiceAccount that is not defined")
    return errs


# ---------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("root", help="the deploy/ directory")
    ap.add_argument("--kubernetes-version", "-k", action="append",
                    help=f"Kubernetes version(s) to validate built-in kinds against "
                         f"(default: {OLDEST_SUPPORTED} and the newest kubernetes-validate ships)")
    args = ap.parse_args()
    versions = args.kubernetes_version or [OLDEST_SUPPORTED, kv.major_minor(kv.latest_version())]
    versions = [full_version(kv.major_minor(v)) for v in versions]

    errors = []
    docs, files = load_docs(args.root, errors)
    kinds = custom_kinds(docs, errors)
    report = []
    cel_skipped = 0

    for d in docs:
        if not d.kind or not d.api_version:
            continue
        checked = []
        builtin = [v for v in versions if builtin_validator(v, d.kind, d.api_version) is not None]
        for v in builtin:
            errs = sorted(builtin_validator(v, d.kind, d.api_version).iter_errors(d.body), key=lambda e: list(e.absolute_path))
            errors += [f"{d.where()}: Kubernetes {kv.major_minor(v)}: {error_text(e)}" for e in errs]
        if builtin:
            checked.append("Kubernetes " + ", ".join(kv.major_minor(v) for v in builtin))
        if d.kind == "CustomResourceDefinition":
            errors += [f"{d.where()}: {e}" for e in crd_errors(d)]
            checked.append("CRD rules")
        custom = kinds.get((d.group, d.kind))
        if not builtin and custom is not None:
            if d.version not in custom.versions:
                errors.append(f"{d.where()}: {d.api_version} is not a served version of {d.kind} ({custom.source})")
            else:
                validator, cel = custom.versions[d.version]
                cel_skipped += cel
                for e in sorted(validator.iter_errors(d.body), key=lambda e: list(e.absolute_path)):
                    errors.append(f"{d.where()}: against {custom.source}: {error_text(e)}")
                if custom.scope == "Namespaced" and not d.namespace:
                    errors.append(f"{d.where()}: {d.kind} is namespaced: metadata.namespace is missing")
                checked.append(("stand-in schema " if custom.stand_in else "CRD schema ") + os.path.basename(custom.source.split(" ")[0]))
        if not checked:
            errors.append(f"{d.where()}: no schema for {d.api_version} {d.kind}: neither a built-in kind of "
                          f"Kubernetes {', '.join(kv.major_minor(v) for v in versions)} nor defined by a CRD")
            continue
        report.append(f"checked {d.where()}: {'; '.join(checked)}")

    errors += cross_reference_errors(docs)

    for line in report:
        print(line)
    print(f"kubernetes-validate {getattr(kv, '__version__', '?')}, Kubernetes "
          f"{', '.join(kv.major_minor(v) for v in versions)} (strict); custom resources against "
          f"{len(kinds)} schemas ({sum(1 for k in kinds.values() if k.stand_in)} stand-ins); "
          f"{cel_skipped} CEL rules not evaluated")
    print(f"{len(docs)} documents in {len(files)} files, {len(errors)} errors")
    if errors:
        print("\nERRORS:")
        for e in errors:
            print(f"  {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

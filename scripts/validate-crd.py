#!/usr/bin/env python3
"""Checks Kubernetes custom resources against CustomResourceDefinition schemas, offline.

    scripts/validate-crd.py --crd CRD.yaml[.gz] [--crd ...] [--allow-unknown-fields] FILE.yaml...

Every object in every FILE whose apiVersion and kind one of the CRDs defines is checked against
that version's openAPIV3Schema: types, enums, patterns, bounds, required fields, and (unless
--allow-unknown-fields) no field the schema does not declare, which is what the API server's
strict field validation (`kubectl apply --validate=strict`) reports. Not checked: CEL rules
(x-kubernetes-validations), formats, admission webhooks.

Prints one line per object: `ok`, `skip` (no CRD given for it) or `FAIL` followed by one
indented line per problem. Exit status: 0 all checked objects valid, 1 some invalid, 2 bad usage
or unreadable input. Needs PyYAML and jsonschema (the project's .venv has both:
scripts/ci/40-export-validate.sh).
"""

import argparse
import copy
import gzip
import sys

import jsonschema
import yaml

try:
    YamlLoader = yaml.CSafeLoader
except AttributeError:  # PyYAML built without libyaml: slower, same result
    YamlLoader = yaml.SafeLoader

# What the API server accepts under `metadata` (ObjectMeta); CRD schemas only say `type: object`
# there because the server validates metadata itself.
OBJECT_META = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "generateName": {"type": "string"},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
        "finalizers": {"type": "array", "items": {"type": "string"}},
        "ownerReferences": {"type": "array", "items": {"type": "object"}},
        "uid": {"type": "string"},
        "resourceVersion": {"type": "string"},
        "generation": {"type": "integer"},
        "creationTimestamp": {"type": ["string", "null"]},
        "deletionTimestamp": {"type": "string"},
        "deletionGracePeriodSeconds": {"type": "integer"},
        "managedFields": {"type": "array", "items": {"type": "object"}},
        "selfLink": {"type": "string"},
    },
}

COMBINATORS = ("allOf", "anyOf", "oneOf")


def is_object(node):
    return node.get("type") == "object" or "properties" in node


def closed(node, strict, in_combinator=False):
    """The JSON Schema (draft 4) that checks what the API server checks for one schema node.

    Kubernetes prunes (and strict validation rejects) any field an object node does not
    declare, unless the node says x-kubernetes-preserve-unknown-fields or gives
    additionalProperties. Branches of anyOf/allOf/oneOf only add value checks to fields the
    main schema declares, so they are never closed themselves.
    """
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {
                name: OBJECT_META if name == "metadata" and is_bare_object(sub)
                else closed(sub, strict, in_combinator)
                for name, sub in value.items()
            }
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = closed(value, strict, in_combinator)
        elif key in COMBINATORS:
            out[key] = [closed(branch, strict, True) for branch in value]
        elif not key.startswith("x-kubernetes-") and key != "nullable":
            out[key] = copy.deepcopy(value)
    if node.get("x-kubernetes-embedded-resource"):
        props = out.setdefault("properties", {})
        props.setdefault("apiVersion", {"type": "string"})
        props.setdefault("kind", {"type": "string"})
        props.setdefault("metadata", OBJECT_META)
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if (
        strict
        and not in_combinator
        and is_object(node)
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def is_bare_object(node):
    return isinstance(node, dict) and set(node) <= {"type", "description"} and node.get("type") == "object"


def read_yaml_documents(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [doc for doc in yaml.load_all(f, Loader=YamlLoader) if doc is not None]


def schemas_of(crd_paths, strict):
    """{(apiVersion, kind): draft-4 validator} for every version of every CRD given."""
    found = {}
    for path in crd_paths:
        for doc in read_yaml_documents(path):
            if doc.get("kind") != "CustomResourceDefinition":
                continue
            spec = doc["spec"]
            for version in spec["versions"]:
                schema = closed(version["schema"]["openAPIV3Schema"], strict)
                root = schema.setdefault("properties", {})
                # The server fills these in and checks them itself; a CR always may carry them.
                root.setdefault("apiVersion", {"type": "string"})
                root.setdefault("kind", {"type": "string"})
                root["metadata"] = OBJECT_META
                api_version = f"{spec['group']}/{version['name']}"
                found[(api_version, spec["names"]["kind"])] = jsonschema.Draft4Validator(schema)
    return found


def describe(path, obj):
    name = (obj.get("metadata") or {}).get("name", "<unnamed>")
    return f"{path}: {obj.get('kind')}/{name} ({obj.get('apiVersion')})"


def main():
    parser = argparse.ArgumentParser(
        description="Validate custom resources against CRD schemas, offline."
    )
    parser.add_argument("--crd", action="append", required=True, metavar="CRD",
                        help="a CRD file (YAML, or YAML compressed with gzip: .gz); repeatable")
    parser.add_argument("--allow-unknown-fields", action="store_true",
                        help="accept fields the schema does not declare (the server would prune them)")
    parser.add_argument("files", nargs="+", metavar="FILE", help="YAML files holding the resources")
    args = parser.parse_args()

    try:
        validators = schemas_of(args.crd, strict=not args.allow_unknown_fields)
    except (OSError, yaml.YAMLError, KeyError, TypeError) as e:
        print(f"cannot read the CRDs {args.crd}: {e}", file=sys.stderr)
        return 2
    if not validators:
        print(f"no CustomResourceDefinition in {args.crd}", file=sys.stderr)
        return 2

    invalid = 0
    for path in args.files:
        try:
            objects = read_yaml_documents(path)
        except (OSError, yaml.YAMLError) as e:
            print(f"cannot read {path}: {e}", file=sys.stderr)
            return 2
        for obj in objects:
            if not isinstance(obj, dict):
                print(f"FAIL {path}: a document that is not a mapping")
                invalid += 1
                continue
            validator = validators.get((obj.get("apiVersion"), obj.get("kind")))
            if validator is None:
                print(f"skip {describe(path, obj)}: no CRD given for it")
                continue
            errors = sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
            if not errors:
                print(f"ok   {describe(path, obj)}")
                continue
            invalid += 1
            print(f"FAIL {describe(path, obj)}")
            for e in errors:
                where = ".".join(str(p) for p in e.absolute_path) or "<root>"
                print(f"     {where}: {e.message[:300]}")
    return 1 if invalid else 0


if __name__ == "__main__":
    sys.exit(main())

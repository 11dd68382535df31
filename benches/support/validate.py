"""The peer of `benches/validate.rs`: PyYAML's C loader plus `jsonschema`, on the same files and schemas.

Usage: validate.py SCHEMA_DIR REPO_DIR. Prints the milliseconds spent loading and validating
(after imports and schema compilation, so the figure is the work itself), then the process's peak
RSS in KiB.
"""
import json
import os
import resource
import sys
import time

import jsonschema
import yaml

schema_dir, repo = sys.argv[1], sys.argv[2]
validators = {}
for kind, file in (("Challenge", "challenge.json"), ("Pipeline", "pipeline.json"), ("Staging", "staging.json")):
    with open(os.path.join(schema_dir, file)) as f:
        schema = json.load(f)
    validators[kind] = jsonschema.Draft202012Validator(schema, format_checker=None)

start = time.perf_counter()
count = errors = 0
for folder, _, files in os.walk(repo):
    for name in files:
        if not name.endswith((".yaml", ".yml")) or folder.endswith("deploy"):
            continue
        with open(os.path.join(folder, name), "rb") as f:
            for doc in yaml.load_all(f, Loader=yaml.CSafeLoader):
                if doc is None:
                    continue
                count += 1
                errors += sum(1 for _ in validators[doc["kind"]].iter_errors(doc))
elapsed = (time.perf_counter() - start) * 1000
assert errors == 0, f"{errors} errors"
print(f"{elapsed:.1f} {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}")

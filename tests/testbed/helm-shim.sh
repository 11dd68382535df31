#!/usr/bin/env bash
# helm-shim.sh: puts a STAND-IN for the helm CLI at DIR/helm, for berth's tests only.
#
# No helm binary can be downloaded on the test machines (only PyPI and Debian's archive are
# reachable, and Debian ships no helm), so berth's tests run `helm` as this stand-in instead. It is
# not helm: it is a small Python program over the PyPI wheel helm-python-sdk 0.2.2 (import name
# helm_python, manylinux_2_28 x86_64), which loads libhelm_c.so (helm-c-sdk 0.2.2: a C ABI
# built from Helm's Go SDK, helm.sh/helm/v4 v4.2.3) with ctypes. Chart loading, value coalescing,
# the template engine (text/template, sprig, include/tpl/required/lookup...) and YAML parsing are
# Helm's own Go code; what `helm template` does around them (splitting, the kind order, hooks,
# the `---` / `# Source:` output) is redone below in Python after Helm v4's pkg/cmd/template.go
# and pkg/release/v1/util.
#
# The stand-in supports exactly what berth calls, and exits 2 on anything else:
#   helm version --short
#   helm template RELEASE CHART [--namespace|-n NS] [--values|-f FILE]...
#                 [--kube-version V] [--api-versions|-a GV[,GV/Kind]...]
# `--kube-version` and `--api-versions` set the Capabilities templates read (through the SDK's
# render options); unlike helm, the stand-in does not refuse a chart whose `kubeVersion` the
# version does not satisfy.
#
# Usage: bash tests/testbed/helm-shim.sh DIR
#   Makes (once) a virtualenv with the wheel in ${XDG_CACHE_HOME:-$HOME/.cache}/berth/helm-python/,
#   writes DIR/helm and prints its path as the last line of stdout (progress goes to stderr).
set -euo pipefail

SDK_VERSION=0.2.2
say() { echo "helm-shim: $*" >&2; }
die() { say "$*"; exit 1; }

[ $# -eq 1 ] || die "usage: bash tests/testbed/helm-shim.sh DIR"
mkdir -p "$1"
dir=$(cd "$1" && pwd)
cache=${XDG_CACHE_HOME:-${HOME:?HOME is not set}/.cache}/berth/helm-python
venv=$cache/venv
py=$venv/bin/python
mkdir -p "$cache"

venv_ok() {
    [ -x "$py" ] && "$py" -I -c "import sys, helm_python as h; sys.exit(h.__version__ != '$SDK_VERSION')" 2>/dev/null
}

if ! venv_ok; then
    if command -v flock >/dev/null; then exec 9>"$cache/.lock"; flock 9; fi # one setup at a time
fi
if ! venv_ok; then
    say "making $venv with helm-python-sdk $SDK_VERSION (a 75 MB wheel)"
    rm -rf "$venv"
    if ! python3 -m venv "$venv" >&2; then
        rm -rf "$venv"
        say "python3 -m venv failed: installing Debian's python3-venv"
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -q python3-venv >&2 || { apt-get update -q >&2 && apt-get install -y -q python3-venv >&2; }
        python3 -m venv "$venv" >&2
    fi
    "$py" -m pip install -q --disable-pip-version-check "helm-python-sdk==$SDK_VERSION" >&2
    # The wheel holds libhelm_c.so three times (.so, .so.0, .so.0.2.2; 85 MB each): hard-link them.
    lib=$("$py" -I -c 'import helm_python, os; print(os.path.dirname(helm_python.__file__))')/lib
    ln -f "$lib/libhelm_c.so.$SDK_VERSION" "$lib/libhelm_c.so.0"
    ln -f "$lib/libhelm_c.so.$SDK_VERSION" "$lib/libhelm_c.so"
    venv_ok || die "helm_python does not load from $venv"
fi

tmp=$(mktemp "$dir/.helm.XXXXXX")
{
    echo '#!/usr/bin/env bash'
    echo "# Stand-in for the helm CLI over the helm-python-sdk $SDK_VERSION wheel, not helm;"
    echo '# written by tests/testbed/helm-shim.sh, which says what it supports.'
    printf 'exec %q -I - "$@" <<'\''PYEOF'\''\n' "$py"
    cat <<'PROGRAM'
import json, re, sys
import helm_python as helm
from helm_python import _native as native

# Helm v4's releaseutil.InstallOrder; kinds not in it come last, alphabetically.
ORDER = {k: i for i, k in enumerate(
    "PriorityClass Namespace NetworkPolicy ResourceQuota LimitRange PodSecurityPolicy "
    "PodDisruptionBudget ServiceAccount Secret SecretList ConfigMap StorageClass PersistentVolume "
    "PersistentVolumeClaim CustomResourceDefinition ClusterRole ClusterRoleList ClusterRoleBinding "
    "ClusterRoleBindingList Role RoleList RoleBinding RoleBindingList Service DaemonSet Pod "
    "ReplicationController ReplicaSet Deployment HorizontalPodAutoscaler StatefulSet Job CronJob "
    "IngressClass Ingress APIService MutatingWebhookConfiguration ValidatingWebhookConfiguration".split())}
HOOKS = set("pre-install post-install pre-delete post-delete pre-upgrade post-upgrade "
            "pre-rollback post-rollback test test-success".split())
SEP = re.compile(r"(?:^|[\t\n\f\r ]*\n)---[\t\n\f\r ]*")  # releaseutil.SplitManifests


def out(stream, text):
    stream.buffer.write(text.encode("utf-8"))
    stream.flush()


def unsupported():
    out(sys.stderr, "unsupported by the test stand-in helm: %s\n" % " ".join(sys.argv[1:]))
    sys.exit(2)


def fail(message):
    out(sys.stderr, "Error: %s\n" % message)
    sys.exit(1)


def merge(a, b):  # helm's values.mergeMaps: maps merge deeply, anything else is replaced
    a = dict(a)
    for k, v in b.items():
        a[k] = merge(a[k], v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v
    return a


def head_ok(h):  # would releaseutil.SimpleHead unmarshal it? (null is fine, other types fail)
    text = lambda v: v is None or isinstance(v, str)
    m = {} if h.get("metadata") is None else h["metadata"]
    ann = (m.get("annotations") or {}) if isinstance(m, dict) else None
    return (text(h.get("apiVersion")) and text(h.get("kind")) and isinstance(m, dict)
            and text(m.get("name")) and isinstance(ann, dict) and all(map(text, ann.values())))


def template(args):
    pos, ns, files, i = [], "default", [], 0
    kube_version, api_versions = None, []
    while i < len(args):
        name, eq, val = args[i].partition("=")
        if name in ("--namespace", "-n", "--values", "-f", "--kube-version", "--api-versions", "-a"):
            if not eq:
                i += 1
                if i == len(args):
                    unsupported()
                val = args[i]
            if name in ("--namespace", "-n"):
                ns = val
            elif name == "--kube-version":
                kube_version = val
            elif name in ("--api-versions", "-a"):
                api_versions += val.split(",")  # a string slice flag in helm
            else:
                files += val.split(",")  # a string slice flag in helm
        elif args[i].startswith("-"):
            unsupported()
        else:
            pos.append(args[i])
        i += 1
    if len(pos) != 2:
        unsupported()
    release, chart_path = pos
    try:
        helm.validate_release_name(release)
    except helm.HelmError as e:
        fail('release name "%s": %s' % (release, e.detail))
    values = {}
    for f in files:
        try:
            with open(f, "rb") as fh:
                text = fh.read().decode("utf-8", "replace")
        except OSError as e:
            fail("open %s: %s" % (f, (e.strerror or str(e)).lower()))
        try:
            values = merge(values, helm.values_from_yaml(text))
        except helm.HelmError as e:
            fail("failed to parse %s: %s" % (f, e.detail))
    try:
        chart = helm.Chart.load(chart_path)
        meta = chart.metadata
        if meta.get("type", "") not in ("", "application"):
            fail("%s charts are not installable" % meta["type"])
        have = {d.get("name") for d in chart.dependencies}
        missing = [d["name"] for d in meta.get("dependencies") or [] if d.get("name") not in have]
        if missing:
            fail("An error occurred while checking for chart dependencies. You may need to run "
                 "`helm dependency build` to fetch missing dependencies: found in Chart.yaml, "
                 "but missing in charts/ directory: " + ", ".join(missing))
        # The SDK's render options carry the Capabilities helm template sets from these flags.
        opts = {"name": release, "namespace": ns, "revision": 1, "is_install": True}
        if kube_version is not None:
            opts["kube_version"] = kube_version
        if api_versions:
            opts["api_versions"] = api_versions
        rendered = json.loads(native.call_string("helm_render", chart._raw(), json.dumps(values), json.dumps(opts)))
    except helm.HelmError as e:
        fail(e.detail)
    manifests, hooks = [], []
    for path in sorted(rendered):  # releaseutil.SortManifests
        content = rendered[path]
        if path.endswith("NOTES.txt") or path.rsplit("/", 1)[-1].startswith("_") or not content.strip():
            continue
        for doc in SEP.split(content.lstrip()):
            if not doc.strip():
                continue
            doc = doc.lstrip()
            try:
                h = helm.values_from_yaml(doc)
            except helm.HelmError as e:
                fail("YAML parse error on %s: %s" % (path, e.detail))
            if not head_ok(h):
                fail("YAML parse error on %s: apiVersion, kind, metadata.name or an annotation "
                     "is not a string" % path)
            kind, ann = h.get("kind") or "", (h.get("metadata") or {}).get("annotations") or {}
            if "helm.sh/hook" not in ann:
                manifests.append((kind, path, doc))
            elif all(t.strip().lower() in HOOKS for t in (ann["helm.sh/hook"] or "").split(",")):
                hooks.append((kind, path, doc))  # a doc with an unknown hook type is dropped
    key = lambda m: (0, ORDER[m[0]], "") if m[0] in ORDER else (1, 0, m[0])
    show = lambda m: "---\n# Source: %s\n%s\n" % (m[1], m[2])
    body = "".join(map(show, sorted(manifests, key=key))).strip() + "\n"
    out(sys.stdout, body + "".join(map(show, sorted(hooks, key=key))))


args = sys.argv[1:]
if args == ["version", "--short"]:
    out(sys.stdout, "%s+helm-python-sdk.%s\n" % (helm.helm_sdk_version(), helm.__version__))
elif args[:1] == ["template"]:
    template(args[1:])
else:
    unsupported()
PROGRAM
    echo 'PYEOF'
} >"$tmp"
chmod 755 "$tmp"
mv -f "$tmp" "$dir/helm"
echo "$dir/helm"

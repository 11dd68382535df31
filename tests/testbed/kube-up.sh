#!/usr/bin/env bash
# Starts a real single-node Kubernetes cluster on loopback, for berth's Staging tests and for users
# who want to try stagings locally, from the recipe verified on the test machines: Debian's own
# `kubernetes` source (v1.20.2) built with Debian's Go 1.19, Debian's etcd, and a kubelet whose
# dockershim drives the local Docker Engine.
#
#   kube-up.sh               build once (cached), start the cluster, print an admin kubeconfig path
#   kube-up.sh --build-only  only make sure the cached binaries and the pause image exist
#
# Progress goes to stderr; the LAST line (the only line on stdout) is the kubeconfig path, so
#   export KUBECONFIG=$(bash tests/testbed/kube-up.sh | tail -1)
# works. Running it again while the cluster is up only prints the path. kube-down.sh stops it.
#
# Environment: BERTH_KUBE_DIR (state, default /tmp/berth-kube), XDG_CACHE_HOME (cache root).
set -euo pipefail

KUBE_VERSION=1.20.2
# The cache key names the patch, so binaries built without it (or with another) are never reused.
PATCH_ID=oom0
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/berth/kube-v${KUBE_VERSION}-${PATCH_ID}
STATE=${BERTH_KUBE_DIR:-/tmp/berth-kube}
# Build logs live next to the cache, not in $STATE: --build-only must not touch a running cluster.
BUILD_LOGS=$(dirname "$CACHE")/logs
PAUSE_IMAGE=berth-pause:local
NODE=node1
API=https://127.0.0.1:6443
BINARIES=(kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy)
# Start order; kube-down.sh stops them in reverse.
COMPONENTS=(etcd kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy)
# Kernel settings the kubelet and kube-proxy change; saved before start, restored by kube-down.sh,
# because this machine is shared and e.g. kernel.panic_on_oops=1 must not outlive the cluster.
SYSCTLS=(kernel.panic kernel.panic_on_oops vm.overcommit_memory vm.panic_on_oom
    kernel.keys.root_maxkeys kernel.keys.root_maxbytes net.ipv4.conf.all.route_localnet)

# The kubelet's built-in AWS credential provider would otherwise ask the EC2 metadata address for
# credentials at start; nothing here may leave loopback, and no image is ever pulled anyway.
export AWS_EC2_METADATA_DISABLED=true

build_only=false
case "${1:-}" in
    --build-only) build_only=true ;;
    "") ;;
    *) echo "usage: $0 [--build-only]" >&2; exit 2 ;;
esac

say() { echo "kube-up: $*" >&2; }
die() { echo "kube-up: error: $*" >&2; exit 1; }
# A failure names the component and its log, and shows the lines that matter, so nobody has to
# hunt. A Go crash ends in pages of goroutine dumps: then its first line is what matters.
fail() { # component, log file, what happened
    local first
    first=$(grep -nE '^(panic: |fatal error: |F[0-9]{4} )' "$2" 2>/dev/null | head -n 1 | cut -d: -f1 || true)
    if [ -n "$first" ]; then
        echo "kube-up: error: $1 $3. Read $2; it crashed at line $first:" >&2
        sed -n "$((first > 8 ? first - 8 : 1)),$((first + 12))p" "$2" | cut -c1-300 | sed 's/^/    | /' >&2
    else
        echo "kube-up: error: $1 $3. Read $2; its last lines:" >&2
        tail -n 25 "$2" 2>/dev/null | cut -c1-300 | sed 's/^/    | /' >&2 || true
    fi
    exit 1
}

pid_of() { cat "$STATE/pids/$1.pid" 2>/dev/null || true; }
# A recorded pid only counts while it still runs the same program: pids get reused.
alive() { # component
    local pid bin
    pid=$(pid_of "$1")
    [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 1
    # The first argument, read up to its NUL without a pipe: under pipefail, `tr | head` failed
    # whenever head closed the pipe before tr was done (a busy machine), and set -e then ended
    # the script with no word said.
    IFS= read -r -d '' bin <"/proc/$pid/cmdline" || true
    case "$(basename -- "$bin")" in
        "$1") return 0 ;;
        # Just started: still the shell (or setsid) that is about to become the component. On a
        # busy machine the first probe came before the exec, and a live API server was taken
        # for one that had exited, with an empty log.
        bash | sh | setsid) return 0 ;;
        *) return 1 ;;
    esac
}

# Not curl's own user agent: the API server pretty-prints JSON for it, and pretty-printing a map
# crashes this build (Go 1.19 with the vendored reflect2 1.0.1, which predates Go 1.18).
admin_curl() { # path, curl options...
    local path=$1
    shift
    curl -sf --max-time 5 -A berth-kube-up --cacert "$STATE/pki/ca.crt" \
        -H "Authorization: Bearer $(cat "$STATE/tokens/admin")" "$@" "$API$path"
}
api_ready() { [ "$(admin_curl /readyz 2>/dev/null)" = ok ]; }
# The API serves conditions with "type" then "status", compactly: no kubectl or JSON tool needed.
node_ready() { admin_curl "/api/v1/nodes/$NODE" 2>/dev/null | grep -q '"type":"Ready","status":"True"'; }

# Polls a probe every half second; a component that exits meanwhile fails at once, with its log.
wait_for() { # component, seconds, what, probe command...
    local name=$1 seconds=$2 what=$3 i
    shift 3
    for ((i = 0; i < seconds * 2; i++)); do
        if "$@"; then return 0; fi
        alive "$name" || fail "$name" "$STATE/logs/$name.log" "exited while waiting until $what"
        sleep 0.5
    done
    fail "$name" "$STATE/logs/$name.log" "did not get to '$what' within ${seconds}s"
}

# Installs only what is missing: apt is slow and other engineers share this machine.
need_packages() { # log file, packages...
    local p log=$1 missing=()
    shift
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    say "installing ${missing[*]} with apt"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -qq --no-install-recommends "${missing[@]}" >"$log" 2>&1; then
        # Package lists may be missing or stale on a fresh machine.
        { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}"; } \
            >>"$log" 2>&1 || fail apt "$log" "could not install ${missing[*]}"
    fi
}

cache_complete() {
    local b
    for b in "${BINARIES[@]}" pause; do [ -x "$CACHE/bin/$b" ] || return 1; done
}

# The machine's own Debian entries turned into source entries. The archive's address comes from
# the machine's sources files, never from this script.
write_debian_src_entries() { # folder
    local f found=false
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        if [ "$(basename "$f")" = debian.sources ] || grep -q debian-archive-keyring "$f"; then
            sed -E 's/^Types:.*/Types: deb-src/' "$f" >"$1/$(basename "$f")"
            found=true
        fi
    done
    if ! $found && [ -f /etc/apt/sources.list ]; then
        sed -nE 's/^deb[[:space:]]+/deb-src /p' /etc/apt/sources.list >"$1/debian-src.list"
        [ -s "$1/debian-src.list" ] && found=true
    fi
    $found || die "found no Debian entry in /etc/apt/sources.list.d/*.sources or /etc/apt/sources.list"
}

# The build is the slow part (6 to 10 minutes on 2 cores): done once, then cached by version and
# patch. It runs in a throwaway folder (about 3 GB), removed afterwards, with its own GOPATH and Go
# build cache so nothing is left in $HOME.
build_binaries() {
    local log=$BUILD_LOGS/build.log work
    mkdir -p "$BUILD_LOGS"
    # One build at a time per cache, even across state folders; a waiter then finds it done.
    exec 8>"$CACHE.lock"
    if ! flock -n 8; then
        say "another build of $CACHE is running; waiting for it"
        flock 8
    fi
    if cache_complete; then exec 8>&-; return 0; fi
    need_packages "$BUILD_LOGS/apt.log" golang-1.19-go rsync make gcc libc6-dev
    work=$(mktemp -d "${TMPDIR:-/tmp}/berth-kube-build.XXXXXX")
    # shellcheck disable=SC2064 # expand $work now: it is local
    trap "rm -rf '$work'" EXIT
    chmod 755 "$work"
    : >"$log"

    say "fetching Debian's kubernetes source (log: $log)"
    mkdir -p "$work/apt/parts" "$work/apt/lists/partial" "$work/dl"
    write_debian_src_entries "$work/apt/parts"
    # A private list folder: the machine's own package lists and caches are left untouched.
    local apt_src=(-o "Dir::Etc::SourceParts=$work/apt/parts" -o Dir::Etc::SourceList=/dev/null
        -o "Dir::State::Lists=$work/apt/lists" -o Dir::Cache::pkgcache= -o Dir::Cache::srcpkgcache=
        -o APT::Sandbox::User=root)
    apt-get "${apt_src[@]}" update >>"$log" 2>&1 || fail "source fetch" "$log" "failed (apt-get update)"
    (cd "$work/dl" && apt-get "${apt_src[@]}" source --download-only kubernetes) >>"$log" 2>&1 ||
        fail "source fetch" "$log" "failed (apt-get source)"
    local origs=("$work"/dl/kubernetes_*.orig.tar.*) orig
    orig=${origs[0]}
    [ -f "$orig" ] || fail "source fetch" "$log" "gave no orig tarball"
    mkdir -p "$work/gopath/src/k8s.io"
    tar -xf "$orig" -C "$work"
    local src=$work/kubernetes-$KUBE_VERSION
    [ -d "$src" ] || fail "source fetch" "$log" "gave $(basename "$orig"), not kubernetes $KUBE_VERSION"
    ln -s "$src" "$work/gopath/src/k8s.io/kubernetes"

    # The one patch: this machine's Docker Engine refuses a negative oom_score_adj ("runc create
    # failed: ... can't get final child's PID from pipe"), which the kubelet asks for on pause
    # containers and Guaranteed pods. Both constants become 0; nothing else changes.
    sed -i -E 's/^(\s*defaultSandboxOOMAdj\s+int\s*=\s*)-998$/\10/' \
        "$src/pkg/kubelet/dockershim/docker_sandbox.go"
    sed -i -E 's/^(\s*guaranteedOOMScoreAdj\s+int\s*=\s*)-997$/\10/' "$src/pkg/kubelet/qos/policy.go"
    if ! grep -Eq '^\s*defaultSandboxOOMAdj\s+int\s*=\s*0$' "$src/pkg/kubelet/dockershim/docker_sandbox.go" ||
        ! grep -Eq '^\s*guaranteedOOMScoreAdj\s+int\s*=\s*0$' "$src/pkg/kubelet/qos/policy.go"; then
        die "the OOM-score patch did not apply: the source is not the expected v$KUBE_VERSION"
    fi

    say "building ${BINARIES[*]} with Go 1.19 (6 to 10 minutes, niced, 2 threads; log: $log)"
    local started=$SECONDS what=""
    for b in "${BINARIES[@]}"; do what+="cmd/$b "; done
    # GOMAXPROCS caps both the go command's parallelism (-p defaults to it) and each compiler's.
    (cd "$work/gopath/src/k8s.io/kubernetes" &&
        nice -n 10 env PATH="/usr/lib/go-1.19/bin:$PATH" GOPATH="$work/gopath" \
            GOCACHE="$work/gocache" GO111MODULE=off CGO_ENABLED=0 GOPROXY=off GOMAXPROCS=2 \
            make WHAT="${what% }") >>"$log" 2>&1 || fail build "$log" "failed"

    # The pause container of every pod: the source's own pause.c, static, for a FROM scratch image.
    local staged=$CACHE.partial.$$
    rm -rf "$staged"
    mkdir -p "$staged/bin"
    gcc -Os -static -DVERSION="v$KUBE_VERSION-berth" -o "$staged/bin/pause" \
        "$src/build/pause/linux/pause.c" >>"$log" 2>&1 || fail "pause build" "$log" "failed"
    for b in "${BINARIES[@]}"; do
        cp "$src/_output/local/bin/linux/amd64/$b" "$staged/bin/$b" ||
            fail build "$log" "did not produce $b"
    done
    cat >"$staged/README" <<EOF
Kubernetes v$KUBE_VERSION server binaries for berth's test cluster (tests/testbed/kube-up.sh).
Built $(date -u +%Y-%m-%dT%H:%M:%SZ) in $((SECONDS - started))s from Debian's source package
$(basename "$orig") with $(/usr/lib/go-1.19/bin/go version | cut -d' ' -f3), CGO_ENABLED=0.
Patch "$PATCH_ID": defaultSandboxOOMAdj -998 -> 0 (pkg/kubelet/dockershim/docker_sandbox.go),
guaranteedOOMScoreAdj -997 -> 0 (pkg/kubelet/qos/policy.go).
bin/pause is build/pause/linux/pause.c compiled with gcc -static, for the berth-pause:local image.
Delete this folder to rebuild.
EOF
    # Appears whole or not at all, so an interrupted build is never mistaken for a cache.
    rm -rf "$CACHE"
    mv "$staged" "$CACHE"
    rm -rf "$work"
    trap - EXIT
    exec 8>&-
    say "built in $((SECONDS - started))s; cached in $CACHE"
}

# Every pod's sandbox runs this image; it must be local, since nothing can be pulled here.
ensure_pause_image() {
    docker image inspect "$PAUSE_IMAGE" >/dev/null 2>&1 && return 0
    say "making the $PAUSE_IMAGE image"
    local ctx log=$BUILD_LOGS/pause-image.log
    mkdir -p "$BUILD_LOGS"
    ctx=$(mktemp -d)
    cp "$CACHE/bin/pause" "$ctx/pause"
    printf 'FROM scratch\nCOPY pause /pause\nENTRYPOINT ["/pause"]\n' >"$ctx/Dockerfile"
    # The classic builder: a FROM scratch image needs no BuildKit, which may be missing.
    DOCKER_BUILDKIT=0 docker build -t "$PAUSE_IMAGE" "$ctx" >"$log" 2>&1 ||
        { rm -rf "$ctx"; fail "pause image" "$log" "could not be built"; }
    rm -rf "$ctx"
}

# A fresh cluster each time it starts: tests then never see objects from an earlier run.
fresh_state() {
    if [ -d "$STATE" ] && [ ! -e "$STATE/.berth-kube" ] && [ -n "$(ls -A "$STATE")" ]; then
        die "$STATE exists and was not made by kube-up.sh; set BERTH_KUBE_DIR to another folder"
    fi
    if [ -e "$STATE/.berth-kube" ] && { [ -n "$(ls -A "$STATE/pids" 2>/dev/null)" ] ||
        findmnt -rn -o TARGET | grep -q "^$STATE/"; }; then
        say "parts of an earlier cluster are left in $STATE; stopping them first"
        BERTH_KUBE_LOCKED=1 bash "$(dirname "$0")/kube-down.sh" >&2
    fi
    # Secret volumes are tmpfs mounts under the kubelet's folder: never delete through a mount.
    if [ -d "$STATE" ] && findmnt -rn -o TARGET | grep -q "^$STATE/"; then
        die "mounts remain under $STATE; run kube-down.sh"
    fi
    rm -rf "$STATE"
    mkdir -p "$STATE"/{logs,pids,pki,tokens,etcd,kubelet}
    touch "$STATE/.berth-kube"
}

# Test certificates: one CA, a serving certificate for the names clients and pods use, and the
# service-account signing key pair.
make_pki() {
    local pki=$STATE/pki log=$STATE/logs/pki.log
    cat >"$pki/openssl.cnf" <<'EOF'
[req]
distinguished_name = dn
[dn]
[ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local
EOF
    {
        openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj /CN=berth-kube-ca \
            -config "$pki/openssl.cnf" -extensions ca -keyout "$pki/ca.key" -out "$pki/ca.crt"
        openssl req -newkey rsa:2048 -nodes -subj /CN=kube-apiserver -config "$pki/openssl.cnf" \
            -keyout "$pki/apiserver.key" -out "$pki/apiserver.csr"
        openssl x509 -req -in "$pki/apiserver.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" \
            -CAcreateserial -days 3650 -sha256 -extfile "$pki/openssl.cnf" -extensions server \
            -out "$pki/apiserver.crt"
        openssl genrsa -out "$pki/sa.key" 2048
        openssl rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub"
    } >"$log" 2>&1 || fail openssl "$log" "could not make the test certificates"
}

# One bearer token per client, all in system:masters (the controller manager runs without
# per-controller service accounts, and RBAC then needs it broad); the API server logs say who.
make_tokens_and_kubeconfigs() {
    local user token ca_data
    ca_data=$(base64 -w0 <"$STATE/pki/ca.crt")
    : >"$STATE/tokens.csv"
    for user in admin kube-controller-manager kube-scheduler kubelet kube-proxy; do
        token=$(openssl rand -hex 24)
        echo "$token" >"$STATE/tokens/$user"
        echo "$token,$user,$user,system:masters" >>"$STATE/tokens.csv"
        cat >"$STATE/$user.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: berth-kube
  cluster:
    server: $API
    certificate-authority-data: $ca_data
users:
- name: $user
  user:
    token: $token
contexts:
- name: berth-kube
  context:
    cluster: berth-kube
    user: $user
current-context: berth-kube
EOF
    done
    chmod 600 "$STATE"/tokens/* "$STATE/tokens.csv" "$STATE"/*.kubeconfig
}

# Daemons get their own session and no terminal, pipe or stdin: they outlive this script, and
# `$(kube-up.sh | tail -1)` returns without waiting for them.
start() { # component, command...
    local name=$1
    shift
    say "starting $name (log: $STATE/logs/$name.log)"
    setsid "$@" </dev/null >"$STATE/logs/$name.log" 2>&1 8>&- 9>&- &
    echo $! >"$STATE/pids/$name.pid"
}

ports_free() {
    local port holder
    for port in 2379 2380 6443 10248 10249 10250 10256; do
        holder=$(ss -Hltnp "sport = :$port" 2>/dev/null | head -n 1 || true)
        [ -z "$holder" ] || die "port 127.0.0.1:$port is taken, so the cluster cannot start: $holder"
    done
}

save_sysctls() {
    local k
    for k in "${SYSCTLS[@]}"; do
        [ -e "/proc/sys/${k//.//}" ] && echo "$k=$(sysctl -n "$k")"
    done >"$STATE/sysctl.saved" 2>/dev/null || true
}

# The kubelet keeps pod logs in fixed host folders; kube-down.sh removes them if they are ours.
note_host_folders() {
    local d
    for d in /var/log/pods /var/log/containers; do
        [ -e "$d" ] || echo "$d"
    done >"$STATE/host-folders.created"
}

# Pods live on Docker's default bridge; the node takes the host's address on it as its IP.
bridge_network() {
    local name
    name=$(docker network inspect bridge -f '{{index .Options "com.docker.network.bridge.name"}}')
    BRIDGE_SUBNET=$(docker network inspect bridge -f '{{range .IPAM.Config}}{{.Subnet}}{{end}}')
    BRIDGE_IP=$(ip -4 -o addr show dev "${name:-docker0}" | awk '{ sub(/\/.*/, "", $4); print $4; exit }')
    if [ -z "$BRIDGE_SUBNET" ] || [ -z "$BRIDGE_IP" ]; then
        die "could not read the address of Docker's bridge network (docker network inspect bridge)"
    fi
}

start_cluster() {
    local bin=$CACHE/bin pki=$STATE/pki
    bridge_network

    # etcd first: the API server keeps everything there.
    start etcd etcd --name berth-kube --data-dir "$STATE/etcd" \
        --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
        --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
        --initial-cluster berth-kube=http://127.0.0.1:2380
    wait_for etcd 30 "healthy" sh -c 'curl -sf --max-time 2 http://127.0.0.1:2379/health | grep -q true'

    # ServiceAccount admission is off because the token controller is: pods need no token. The
    # API server cannot publish a loopback address as the kubernetes Service's endpoint, so it
    # does not try. It never dials the kubelet (so no kubectl logs or exec): the node has no
    # ExternalDNS address, and its other addresses are not on loopback, where traffic must stay.
    start kube-apiserver "$bin/kube-apiserver" --etcd-servers=http://127.0.0.1:2379 \
        --bind-address=127.0.0.1 --secure-port=6443 --advertise-address=127.0.0.1 --insecure-port=0 \
        --tls-cert-file="$pki/apiserver.crt" --tls-private-key-file="$pki/apiserver.key" \
        --client-ca-file="$pki/ca.crt" --token-auth-file="$STATE/tokens.csv" \
        --service-account-key-file="$pki/sa.pub" --service-account-signing-key-file="$pki/sa.key" \
        --service-account-issuer=https://kubernetes.default.svc \
        --kubelet-preferred-address-types=ExternalDNS \
        --authorization-mode=RBAC --service-cluster-ip-range=10.0.0.0/24 --endpoint-reconciler-type=none \
        --disable-admission-plugins=ServiceAccount --allow-privileged=true
    wait_for kube-apiserver 60 "/readyz answers ok" api_ready

    start kube-controller-manager "$bin/kube-controller-manager" \
        --kubeconfig="$STATE/kube-controller-manager.kubeconfig" \
        --service-account-private-key-file="$pki/sa.key" --root-ca-file="$pki/ca.crt" \
        --controllers='*,-serviceaccount-token' --leader-elect=false --port=0 --secure-port=0
    start kube-scheduler "$bin/kube-scheduler" --kubeconfig="$STATE/kube-scheduler.kubeconfig" \
        --leader-elect=false --port=0 --secure-port=0

    # The kubelet drives the local Docker Engine through its dockershim. It keeps all its state
    # under $STATE; the image GC thresholds stop it from deleting the locally made images, which
    # could never be pulled back. --node-ip spares it a DNS query for "node1" every 10 seconds.
    start kubelet "$bin/kubelet" --kubeconfig="$STATE/kubelet.kubeconfig" \
        --container-runtime=docker --pod-infra-container-image="$PAUSE_IMAGE" \
        --fail-swap-on=false --cgroup-driver=cgroupfs --root-dir="$STATE/kubelet" \
        --cert-dir="$STATE/kubelet/pki" --experimental-dockershim-root-directory="$STATE/dockershim" \
        --volume-plugin-dir="$STATE/kubelet/volume-plugins" \
        --read-only-port=0 --port=10250 --address=127.0.0.1 --healthz-bind-address=127.0.0.1 \
        --hostname-override="$NODE" --node-ip="$BRIDGE_IP" --cgroups-per-qos=false --enforce-node-allocatable= \
        --eviction-hard= --image-gc-high-threshold=100 --image-gc-low-threshold=99 \
        --anonymous-auth=false --authentication-token-webhook=false --authorization-mode=AlwaysAllow --oom-score-adj=0
    # kube-proxy in iptables mode makes NodePorts answer on 127.0.0.1, and only there: nothing is
    # opened on the machine's network. The conntrack settings are the machine's and left alone.
    start kube-proxy "$bin/kube-proxy" --kubeconfig="$STATE/kube-proxy.kubeconfig" \
        --hostname-override="$NODE" --proxy-mode=iptables --cluster-cidr="$BRIDGE_SUBNET" \
        --nodeport-addresses=127.0.0.0/8 \
        --metrics-bind-address=127.0.0.1:10249 --healthz-bind-address=127.0.0.1:10256 \
        --conntrack-max-per-core=0 --conntrack-tcp-timeout-established=0 \
        --conntrack-tcp-timeout-close-wait=0 --oom-score-adj=0

    wait_for kubelet 90 "node $NODE is Ready" node_ready
    wait_for kube-proxy 30 "healthz answers" curl -sf --max-time 2 -o /dev/null http://127.0.0.1:10256/healthz
    # The controller manager shows it works by giving the default namespace its service account.
    wait_for kube-controller-manager 60 "the default service account exists" \
        admin_curl /api/v1/namespaces/default/serviceaccounts/default -o /dev/null
    local c
    for c in "${COMPONENTS[@]}"; do
        alive "$c" || fail "$c" "$STATE/logs/$c.log" "exited"
    done
}

all_alive() {
    local c
    for c in "${COMPONENTS[@]}"; do alive "$c" || return 1; done
}

# --- main ---
[ "$(id -u)" -eq 0 ] || die "run as root: the kubelet mounts volumes and kube-proxy writes iptables rules"
if ! docker info >/dev/null 2>&1; then
    die "the Docker Engine is not answering (docker info); the kubelet needs it"
fi

# One kube-up or kube-down at a time per state folder; daemons do not inherit the lock.
exec 9>"$STATE.lock"
if ! flock -n 9; then
    say "another kube-up.sh or kube-down.sh is using $STATE; waiting for it"
    flock 9
fi

if $build_only; then
    cache_complete || build_binaries
    ensure_pause_image
    say "binaries cached in $CACHE"
    exit 0
fi

# Idempotent: a cluster that is up is only reported.
if all_alive; then
    say "the cluster in $STATE is running; waiting until it is ready"
    wait_for kube-apiserver 60 "/readyz answers ok" api_ready
    wait_for kubelet 90 "node $NODE is Ready" node_ready
    echo "$STATE/admin.kubeconfig"
    exit 0
fi

fresh_state
# ipset and conntrack: kube-proxy's cleanup and UDP handling call them.
need_packages "$STATE/logs/apt.log" etcd-server openssl iptables ipset conntrack curl
if cache_complete; then
    say "using cached binaries in $CACHE"
else
    build_binaries
fi
ensure_pause_image
ports_free
make_pki
make_tokens_and_kubeconfigs
save_sysctls
note_host_folders
# kube-down.sh runs `kube-proxy --cleanup` from the same binaries.
echo "$CACHE" >"$STATE/cache-dir"
started=$SECONDS
start_cluster
say "cluster up in $((SECONDS - started))s: node $NODE Ready, API $API, state and logs in $STATE"
say "stop it with: bash $(dirname "$0")/kube-down.sh"
echo "$STATE/admin.kubeconfig"

#!/usr/bin/env bash
# Stops the cluster tests/testbed/kube-up.sh started and takes away what it left on the machine:
# its processes (by the pids it recorded), the kubelet's containers, kube-proxy's iptables rules,
# volume mounts and the kernel settings the kubelet and kube-proxy changed. The built binaries stay
# cached, and the state folder stays for its logs until the next kube-up.sh. Safe to run again.
#
# Environment: BERTH_KUBE_DIR (state, default /tmp/berth-kube).
set -euo pipefail

STATE=${BERTH_KUBE_DIR:-/tmp/berth-kube}
# Reverse start order: the kubelet goes before the API server, so it does not spend its last
# seconds failing to report, and nothing restarts containers while they are being removed.
COMPONENTS=(kube-proxy kubelet kube-scheduler kube-controller-manager kube-apiserver etcd)

say() { echo "kube-down: $*" >&2; }

[ "$(id -u)" -eq 0 ] || { say "error: run as root, as kube-up.sh was"; exit 1; }

# One kube-up or kube-down at a time; kube-up.sh already holds the lock when it calls this.
if [ -z "${BERTH_KUBE_LOCKED:-}" ]; then
    exec 9>"$STATE.lock"
    if ! flock -n 9; then
        say "another kube-up.sh or kube-down.sh is using $STATE; waiting for it"
        flock 9
    fi
fi

if [ ! -e "$STATE/.berth-kube" ]; then
    say "no cluster state in $STATE; nothing to stop"
    exit 0
fi

# A recorded pid only counts while it still runs the same program: pids get reused.
alive() { # component, pid
    local bin
    [ -r "/proc/$2/cmdline" ] || return 1
    bin=$(tr '\0' '\n' <"/proc/$2/cmdline" | head -n 1)
    [ "$(basename -- "$bin")" = "$1" ]
}

# SIGTERM first so etcd and the API server close cleanly; SIGKILL after 15 s.
stop() { # component
    local file=$STATE/pids/$1.pid pid i
    [ -f "$file" ] || return 0
    pid=$(cat "$file")
    if alive "$1" "$pid"; then
        say "stopping $1 (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 30; i++)); do
            alive "$1" "$pid" || break
            sleep 0.5
        done
        if alive "$1" "$pid"; then
            say "$1 (pid $pid) ignored SIGTERM; killing it"
            kill -KILL "$pid" 2>/dev/null || true
            sleep 0.5
        fi
    fi
    rm -f "$file"
}

remove_pod_containers() {
    local ids
    # The dockershim names every container it makes k8s_…; the label makes sure it made it.
    ids=$(docker ps -aq --filter name=k8s_ --filter label=io.kubernetes.docker.type)
    [ -n "$ids" ] || return 0
    say "removing $(echo "$ids" | wc -l) pod containers"
    # shellcheck disable=SC2086 # one id per word
    docker rm -f -v $ids >/dev/null
}

# A component whose pid was never recorded or was recorded over (a start cut short, then tried
# again) is found by the state folder its command line names: seen once left running, a kubelet
# made the folder again after it was cleaned and held every later start.
stop_strays() {
    local pid bin
    for pid in $(pgrep -f -- "$STATE/" || true); do
        [ -r "/proc/$pid/cmdline" ] || continue
        bin=$(tr '\0' '\n' <"/proc/$pid/cmdline" | head -n 1)
        case "$(basename -- "$bin")" in
        etcd | kubelet | kube-apiserver | kube-controller-manager | kube-scheduler | kube-proxy)
            say "stopping $(basename -- "$bin") (pid $pid), which no pid file named"
            kill -KILL "$pid" 2>/dev/null || true
            ;;
        esac
    done
}

for c in "${COMPONENTS[@]}"; do
    stop "$c"
    # Containers go as soon as the kubelet is gone, before the API server, so nothing is orphaned
    # even if a later step fails.
    [ "$c" = kubelet ] && remove_pod_containers
done
stop_strays
# A stray kubelet may have made pod containers until it was stopped.
remove_pod_containers

# kube-proxy's own cleanup knows every chain and rule it writes.
cache=$(cat "$STATE/cache-dir" 2>/dev/null || true)
if [ -x "$cache/bin/kube-proxy" ]; then
    "$cache/bin/kube-proxy" --cleanup >"$STATE/logs/kube-proxy-cleanup.log" 2>&1 ||
        say "kube-proxy --cleanup reported errors (see $STATE/logs/kube-proxy-cleanup.log)"
else
    say "no kube-proxy binary recorded; its iptables rules, if any, stay"
fi

# The kubelet writes a few chains of its own (KUBE-FIREWALL, KUBE-MARK-*, canaries) that
# kube-proxy's cleanup does not know. Only a kubelet or kube-proxy makes KUBE-* chains, and only
# kube-up.sh runs them here: take out the jumps from the built-in chains, then the chains.
remove_kube_chains() { # iptables command
    local ipt=$1 table chain chains n
    command -v "$ipt" >/dev/null || return 0
    for table in filter nat mangle; do
        for chain in $("$ipt" -t "$table" -S 2>/dev/null | awk '$1 == "-P" { print $2 }'); do
            for n in $("$ipt" -t "$table" -L "$chain" -n --line-numbers 2>/dev/null |
                awk '$2 ~ /^KUBE-/ { print $1 }' | sort -rn); do
                "$ipt" -t "$table" -D "$chain" "$n"
            done
        done
        chains=$("$ipt" -t "$table" -S 2>/dev/null | awk '$1 == "-N" && $2 ~ /^KUBE-/ { print $2 }')
        for chain in $chains; do "$ipt" -t "$table" -F "$chain"; done
        for chain in $chains; do "$ipt" -t "$table" -X "$chain"; done
    done
}
remove_kube_chains iptables
remove_kube_chains ip6tables

# Secret and projected volumes are tmpfs mounts under the kubelet's folder; deepest first.
findmnt -rn -o TARGET | { grep "^$STATE/" || true; } | sort -r | while read -r mnt; do
    umount "$mnt" 2>/dev/null || umount -l "$mnt" || say "could not unmount $mnt"
done

# The kubelet and kube-proxy change kernel settings; this machine is shared, so put them back.
if [ -f "$STATE/sysctl.saved" ]; then
    while IFS='=' read -r key value; do
        [ -n "$key" ] || continue
        sysctl -q -w "$key=$value" >/dev/null 2>&1 || say "could not restore $key to $value"
    done <"$STATE/sysctl.saved"
    rm -f "$STATE/sysctl.saved"
fi

# The kubelet's pod log folders are fixed host paths; remove them only if it made them.
if [ -f "$STATE/host-folders.created" ]; then
    while read -r dir; do
        [ -n "$dir" ] && rm -rf -- "$dir"
    done <"$STATE/host-folders.created"
    rm -f "$STATE/host-folders.created"
fi

say "stopped; logs stay in $STATE/logs, binaries stay cached"

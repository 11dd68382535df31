#!/usr/bin/env bash
# Makes a local `busybox:latest` image from Debian's static busybox, because no image can be
# pulled here. Descriptors and Dockerfiles written for the real busybox image work unchanged.
#
# An image of that name may exist already, made by another tool, without what the tests rely on
# (issue 8, item 17). So the image is probed, not trusted by name: when it lacks an applet, /tmp,
# /etc/passwd or /www/index.html, the script says what is missing and makes it again. It does
# nothing when the image passes the probe.
#
# BERTH_BUSYBOX_TAG names another tag to check and make, so the remaking can be tested without
# touching the `busybox:latest` that other tests on this engine are using.
set -euo pipefail

tag=${BERTH_BUSYBOX_TAG:-busybox:latest}
# Set on the images this script makes, so `docker inspect` tells where one came from.
label=org.berth.testbed=busybox-static

# What the integration tests and the sample repo run in the image: applets in commands, health
# checks (nc, wget) and Dockerfile RUN lines (sh), files served by httpd, a writable /tmp.
probe='
missing=""
for applet in sh httpd nc wget sleep echo cat env id ls ps true; do
    command -v "$applet" >/dev/null || missing="$missing $applet"
done
{ test -d /tmp && test -w /tmp; } || missing="$missing /tmp"
grep -qs "^root:" /etc/passwd || missing="$missing /etc/passwd"
grep -qs busybox /www/index.html || missing="$missing /www/index.html"
test -z "$missing" || { echo "it lacks$missing"; exit 1; }
'

# Prints why "$tag" cannot serve the tests; prints nothing and succeeds when it can.
lacks() {
    local why
    if ! docker image inspect "$tag" >/dev/null 2>&1; then
        echo "it does not exist"
        return 0
    fi
    if why=$(docker run --rm --network none --entrypoint /bin/sh "$tag" -c "$probe" 2>&1); then
        return 1
    fi
    echo "${why:-the probe failed}" | tail -1
}

if ! why=$(lacks); then
    exit 0
fi
echo "$tag cannot serve the tests: $why; making it from Debian's busybox-static" >&2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
if ! apt-get download busybox-static >/dev/null 2>&1; then
    apt-get update -qq >/dev/null
    apt-get download busybox-static >/dev/null
fi
dpkg -x busybox-static_*.deb pkg
mkdir -p rootfs/bin rootfs/sbin rootfs/usr/bin rootfs/usr/sbin rootfs/tmp rootfs/etc rootfs/www rootfs/root
cp pkg/bin/busybox rootfs/bin/busybox
for applet in $(rootfs/bin/busybox --list-full); do
    [ "$applet" = bin/busybox ] && continue
    mkdir -p "rootfs/$(dirname "$applet")"
    ln -sf /bin/busybox "rootfs/$applet"
done
chmod 1777 rootfs/tmp
echo 'root:x:0:0:root:/root:/bin/sh' > rootfs/etc/passwd
echo 'root:x:0:' > rootfs/etc/group
echo '<h1>busybox</h1>' > rootfs/www/index.html
tar -C rootfs -cf busybox.tar .
docker import --change 'CMD ["sh"]' --change "LABEL $label" busybox.tar "$tag" >/dev/null
if why=$(lacks); then
    echo "made $tag, but it still cannot serve the tests: $why" >&2
    exit 1
fi
echo "made $tag from Debian's busybox-static"

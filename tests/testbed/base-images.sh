#!/usr/bin/env bash
# Makes the two local base images that packaging/container/Dockerfile builds from, because no image
# can be pulled here:
#
#   berth-builder:local  Debian's gcc, libc6-dev, pkg-config and the -dev packages of OpenSSL,
#                        SQLite and zlib, plus this machine's own Rust toolchain (`rustup which
#                        cargo`'s toolchain: cargo, rustc and the x86_64 standard library only);
#   berth-runtime:local  glibc, libgcc, libssl3, libsqlite3-0, zlib1g and the CA bundle: what the
#                        berth binary loads (see `ldd`), with no shell and no package manager,
#                        an /etc/passwd naming the user berth (uid 10001) and a writable /tmp.
#
# Each is a root tree unpacked from Debian packages fetched with `apt-get download` (the machine's
# own package sources, nothing else), given to `docker import`. Maintainer scripts do not run, so
# the script does by hand the little they would have done (the ld.so cache, `cc`, `/bin/sh`, the
# CA bundle).
#
# Idempotent: an image is made again only when it is missing or was made by another recipe (the
# label org.berth.recipe holds a digest of this script and, for the builder, of the toolchain's
# version), so a run with both images in place takes a second.
#
# Usage: base-images.sh [builder|runtime]...   (both when none is named)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
script_digest=$(sha256sum "$here/base-images.sh" | cut -c1-16)

# What the build stage needs to compile berth and its C dependencies (libgit2 and libssh2 are
# vendored by their -sys crates and compiled with gcc; OpenSSL, SQLite and zlib are linked from
# the system), and what its RUN lines use.
BUILDER_PACKAGES="gcc libc6-dev pkg-config libssl-dev libsqlite3-dev zlib1g-dev dash coreutils findutils grep sed"
# What `ldd berth` names, and the CA bundle for https remotes and API servers.
RUNTIME_PACKAGES="libc6 libgcc-s1 libssl3 libsqlite3-0 zlib1g ca-certificates"
BERTH_UID=10001

say() { echo "base-images: $*" >&2; }

# The image's recipe label, or nothing when the image is missing.
recipe_of() {
    docker image inspect -f '{{index .Config.Labels "org.berth.recipe"}}' "$1" 2>/dev/null || true
}

# Downloads the packages named and everything they depend on into the current folder.
download_closure() {
    local closure
    # shellcheck disable=SC2086 # word splitting of the package list is meant
    closure=$(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts \
        --no-breaks --no-replaces --no-enhances $1 | grep '^[a-z0-9]' | sort -u)
    # Only what is needed: priority-required packages with maintainer-script duties (dpkg,
    # debconf, install-info) are pulled in by the recursion but never run here.
    closure=$(echo "$closure" | grep -vxE 'dpkg|debconf|cdebconf|install-info|debianutils|tar|perl-base|libdebian-installer4|libnewt0.52|libslang2|libtextwrap1|readline-common|libreadline8|libtinfo6|openssl')
    # shellcheck disable=SC2086
    if ! apt-get download $closure >/dev/null 2>&1; then
        apt-get update -qq >/dev/null
        # shellcheck disable=SC2086
        apt-get download $closure >/dev/null
    fi
}

# Unpacks every .deb of the current folder into $1, on a merged /usr as Debian 12 installs it.
unpack_into() {
    local root=$1 deb
    mkdir -p "$root/usr/bin" "$root/usr/sbin" "$root/usr/lib" "$root/usr/lib64" "$root/etc" "$root/tmp"
    for dir in bin sbin lib lib64; do ln -sfn "usr/$dir" "$root/$dir"; done
    for deb in ./*.deb; do
        dpkg-deb --fsys-tarfile "$deb" | tar -x --keep-directory-symlink -C "$root"
    done
    rm -rf "$root/usr/share/doc" "$root/usr/share/man" "$root/usr/share/info" "$root/usr/share/locale" \
        "$root/usr/share/lintian"
    chmod 1777 "$root/tmp"
    ldconfig -r "$root"
}

import() {
    local root=$1 tag=$2 recipe=$3
    shift 3
    tar -C "$root" -cf "$work/$tag.tar" .
    docker import "$@" --change "LABEL org.berth.recipe=$recipe org.berth.testbed=base-images" \
        "$work/$tag.tar" "$tag" >/dev/null
    rm -f "$work/$tag.tar"
}

make_builder() {
    local tag=berth-builder:local toolchain recipe started=$SECONDS
    toolchain=$(dirname "$(dirname "$(rustup which cargo)")")
    recipe="$script_digest-$("$toolchain/bin/rustc" -V | cut -d' ' -f2)"
    if [ "$(recipe_of "$tag")" = "$recipe" ]; then
        say "$tag is up to date ($recipe)"
        return
    fi
    say "making $tag from Debian's packages and the Rust toolchain in $toolchain"
    mkdir -p "$work/builder-debs" && cd "$work/builder-debs"
    download_closure "$BUILDER_PACKAGES"
    unpack_into "$work/builder"
    # What update-alternatives and dash's postinst would have made.
    ln -sf gcc "$work/builder/usr/bin/cc"
    [ -e "$work/builder/usr/bin/sh" ] || ln -s dash "$work/builder/usr/bin/sh"
    # The toolchain, without its docs, sources and the tools a build does not run (clippy, fmt).
    local rust=$work/builder/usr/local/rust
    mkdir -p "$rust/bin" "$rust/lib/rustlib"
    cp -a "$toolchain/bin/cargo" "$toolchain/bin/rustc" "$rust/bin/"
    cp -a "$toolchain"/lib/*.so* "$rust/lib/"
    cp -a "$toolchain/lib/rustlib/x86_64-unknown-linux-gnu" "$rust/lib/rustlib/"
    echo 'root:x:0:0:root:/root:/bin/sh' >"$work/builder/etc/passwd"
    echo 'root:x:0:' >"$work/builder/etc/group"
    mkdir -p "$work/builder/root"
    import "$work/builder" "$tag" "$recipe" \
        --change 'ENV PATH=/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV CARGO_HOME=/usr/local/cargo' \
        --change 'CMD ["/bin/sh"]'
    say "made $tag in $((SECONDS - started))s"
}

make_runtime() {
    local tag=berth-runtime:local recipe=$script_digest started=$SECONDS
    if [ "$(recipe_of "$tag")" = "$recipe" ]; then
        say "$tag is up to date ($recipe)"
        return
    fi
    say "making $tag from Debian's packages"
    mkdir -p "$work/runtime-debs" && cd "$work/runtime-debs"
    local deb
    # Exactly these packages, not their closure: their maintainer-script dependencies (debconf,
    # openssl) have no use in an image without a shell.
    # shellcheck disable=SC2086
    if ! apt-get download $RUNTIME_PACKAGES >/dev/null 2>&1; then
        apt-get update -qq >/dev/null
        # shellcheck disable=SC2086
        apt-get download $RUNTIME_PACKAGES >/dev/null
    fi
    local root=$work/runtime
    unpack_into "$root"
    # ca-certificates' postinst makes the bundle; OpenSSL's default paths lead to it.
    mkdir -p "$root/etc/ssl/certs" "$root/usr/lib/ssl"
    for deb in "$root"/usr/share/ca-certificates/mozilla/*.crt; do cat "$deb"; done \
        >"$root/etc/ssl/certs/ca-certificates.crt"
    ln -sfn /etc/ssl/certs "$root/usr/lib/ssl/certs"
    ln -sfn /etc/ssl/certs/ca-certificates.crt "$root/usr/lib/ssl/cert.pem"
    rm -rf "$root/usr/sbin/update-ca-certificates" "$root/etc/ca-certificates" "$root/usr/share/ca-certificates"
    printf 'root:x:0:0:root:/root:/usr/sbin/nologin\nberth:x:%s:%s:berth:/var/lib/berth:/usr/sbin/nologin\n' \
        "$BERTH_UID" "$BERTH_UID" >"$root/etc/passwd"
    printf 'root:x:0:\nberth:x:%s:\n' "$BERTH_UID" >"$root/etc/group"
    import "$root" "$tag" "$recipe"
    say "made $tag in $((SECONDS - started))s"
}

which=("$@")
[ ${#which[@]} -gt 0 ] || which=(builder runtime)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for image in "${which[@]}"; do
    case $image in
        builder) make_builder ;;
        runtime) make_runtime ;;
        *) echo "usage: $0 [builder|runtime]..." >&2; exit 2 ;;
    esac
done

#!/usr/bin/env bash
# Build lorakube's two images without a Docker engine or a registry: buildah (daemonless, vfs
# storage, chroot isolation, as root) builds the unchanged Dockerfiles on a local stand-in for the
# python:3.11-slim-bookworm base, made with debootstrap. Used by `make images`; see docs/images.md.
#
#   devtools/images.sh base       # the stand-in base only (cached by its recipe)
#   devtools/images.sh operator   # base + lorakube-operator:<version>
#   devtools/images.sh trainer    # base + lorakube-trainer:<version>
#   devtools/images.sh all        # base + both (what `make images` runs)
#
# Environment: FORCE=1 (rebuild even when no input changed), BUILD_CACHE (debootstrap's .deb cache; default $LORAKUBE_CACHE/images),
# DEBIAN_MIRROR (debootstrap's mirror; default: debootstrap's own), IMAGES_TIMINGS (a file that
# gets one "<image> <seconds>" line per build, for the docs' figures).
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO_ROOT"

# vfs: works on any filesystem and inside containers (no overlay mounts); chroot isolation: no
# user namespaces needed. Both slow and disk-hungry, which is why the Dockerfiles keep few steps.
BUILDAH=(buildah --storage-driver vfs)
BASE_NAME=localhost/lorakube-base
SUITE=bookworm
# What the Dockerfiles expect from python:3.11-slim-bookworm: `python` (python-is-python3),
# `python -m venv` (python3-venv: ensurepip), TLS roots for pip, useradd (passwd is in minbase).
BASE_PACKAGES=python3,python3-venv,python-is-python3,ca-certificates
LORAKUBE_CACHE=${LORAKUBE_CACHE:-$HOME/.cache/lorakube}
BUILD_CACHE=${BUILD_CACHE:-$LORAKUBE_CACHE/images}

VERSION=$(sed -n 's/^version *= *"\(.*\)"/\1/p' pyproject.toml | head -n1)
[[ -n $VERSION ]] || { echo "images.sh: no version = \"...\" in pyproject.toml" >&2; exit 2; }

need_root() {
    if [[ $(id -u) != 0 ]]; then
        echo "images.sh: buildah with --isolation chroot and debootstrap need root; run it as root (sudo make images)" >&2
        exit 2
    fi
}

# A fresh Debian/Ubuntu machine has neither tool; install them once (their versions come from the
# distribution, which is what the docs' figures were measured with).
ensure_tools() {
    local missing=()
    command -v buildah >/dev/null || missing+=(buildah)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    ((${#missing[@]} == 0)) && return 0
    command -v apt-get >/dev/null || {
        echo "images.sh: ${missing[*]} missing and no apt-get here; install ${missing[*]} with your package manager" >&2
        exit 2
    }
    echo "images.sh: installing ${missing[*]} with apt-get" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# The base is rebuilt only when its recipe changes: the key hashes this function's own text and
# the package list, and becomes the tag's suffix.
base_recipe_key() {
    { declare -f build_base; echo "$SUITE $BASE_PACKAGES ${DEBIAN_MIRROR:-}"; } | sha256sum | cut -c1-12
}

base_tag() { echo "$BASE_NAME:python3.11-$SUITE-$(base_recipe_key)"; }

build_base() {
    local tag=$1 ctr mnt
    mkdir -p "$BUILD_CACHE/debs"
    ctr=$("${BUILDAH[@]}" from scratch)
    # debootstrap straight into the container's root: no second copy of the tree on disk.
    mnt=$("${BUILDAH[@]}" mount "$ctr")
    trap '"${BUILDAH[@]}" rm "$ctr" >/dev/null 2>&1 || true' RETURN
    debootstrap --variant=minbase --include="$BASE_PACKAGES" --cache-dir="$BUILD_CACHE/debs" \
        "$SUITE" "$mnt" ${DEBIAN_MIRROR:+"$DEBIAN_MIRROR"}
    # The same apt sources as Debian's official images (updates and security included), so the
    # trainer Dockerfile's `apt-get install` resolves the same way on this base as on python:3.11-slim.
    # The mirror is the one debootstrap used (its default unless DEBIAN_MIRROR says otherwise).
    local mirror
    mirror=$(awk '$1 == "deb" {print $2; exit}' "$mnt/etc/apt/sources.list")
    rm -f "$mnt/etc/apt/sources.list"
    cat >"$mnt/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $mirror
Suites: $SUITE $SUITE-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: ${mirror%/debian}/debian-security
Suites: $SUITE-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    # Debian's own pip (python3-pip) trusts the system CA store; python.org's pip in python:3.11-slim
    # and the pip a venv bootstraps use certifi's list instead. Naming the system bundle here keeps
    # pip on Debian's list, and lets a build behind a TLS-intercepting proxy work (see host_trust).
    printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$mnt/etc/pip.conf"
    "${BUILDAH[@]}" umount "$ctr" >/dev/null
    "${BUILDAH[@]}" run --isolation chroot "$ctr" -- sh -c \
        'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get upgrade -y -qq >/dev/null \
         && apt-get clean && rm -rf /var/lib/apt/lists/* /var/log/apt/* /var/log/dpkg.log /var/cache/debconf/*-old'
    # python:3.11-slim sets LANG and starts python3; keep the same so the images behave alike.
    "${BUILDAH[@]}" config --env LANG=C.UTF-8 --cmd python3 \
        --label org.opencontainers.image.description="debootstrap $SUITE minbase + $BASE_PACKAGES (lorakube's local stand-in for python:3.11-slim-$SUITE)" \
        "$ctr"
    "${BUILDAH[@]}" commit --rm "$ctr" "$tag" >/dev/null
    trap - RETURN
}

ensure_base() {
    local tag
    tag=$(base_tag)
    if "${BUILDAH[@]}" inspect --type image "$tag" >/dev/null 2>&1; then
        echo "images.sh: base $tag is up to date" >&2
    else
        echo "images.sh: building base $tag (debootstrap $SUITE minbase)" >&2
        build_base "$tag" >&2
        # An older recipe's base only wastes disk now.
        "${BUILDAH[@]}" images --format '{{.Name}}:{{.Tag}}' | grep "^$BASE_NAME:" | grep -vx "$tag" |
            xargs -r "${BUILDAH[@]}" rmi >/dev/null 2>&1 || true
    fi
    echo "$tag"
}

# What a build reads: the Dockerfile, what its COPY lines take from the context, .dockerignore,
# and the base. An image whose label holds the same hash is current and is not rebuilt.
build_inputs_key() {
    local dockerfile=$1 base=$2 sources
    sources=$(awk 'toupper($1) == "COPY" && $2 !~ /^--from/ {for (i = 2; i < NF; i++) print $i}' "$dockerfile")
    {
        echo "$base"
        # shellcheck disable=SC2086  # the COPY sources are words
        find "$dockerfile" .dockerignore $sources -type f ! -path '*/__pycache__/*' ! -name '*.pyc' -print0 |
            sort -z | xargs -0 sha256sum
    } | sha256sum | cut -c1-16
}

# One image from one Dockerfile. --layers=false: with vfs every layer is a full copy of the root
# file system, so each stage is committed once; the pip cache mount keeps downloads out of layers.
build_image() {
    local name=$1 dockerfile=$2 base=$3 start key
    key=$(build_inputs_key "$dockerfile" "$base")
    if [[ -z ${FORCE:-} ]] && [[ $("${BUILDAH[@]}" inspect --type image \
        --format '{{index .OCIv1.Config.Labels "org.lorakube.build-inputs"}}' "$name:$VERSION" 2>/dev/null) == "$key" ]]; then
        echo "images.sh: $name:$VERSION is up to date (inputs $key; FORCE=1 rebuilds)" >&2
        return 0
    fi
    # An image replaced by an earlier build is untagged now; on vfs it holds whole copies of its tree.
    "${BUILDAH[@]}" rmi --prune >/dev/null 2>&1 || true
    start=$(date +%s)
    echo "images.sh: building $name:$VERSION from $dockerfile on $base" >&2
    "${BUILDAH[@]}" bud --isolation chroot --layers=false --pull-never "${TRUST[@]}" \
        --label org.lorakube.build-inputs="$key" \
        --build-arg PYTHON_IMAGE="$base" -f "$dockerfile" -t "$name:$VERSION" .
    # Drop the untagged build-stage images the multi-stage build leaves behind (whole copies on vfs).
    "${BUILDAH[@]}" rmi --prune >/dev/null 2>&1 || true
    echo "images.sh: $name:$VERSION built in $(($(date +%s) - start)) s" >&2
    [[ -z ${IMAGES_TIMINGS:-} ]] || echo "$name $(($(date +%s) - start))" >>"$IMAGES_TIMINGS"
}

# Networks that intercept TLS (corporate proxies) add their CA to the host's bundle; pip in the
# build does not know it. The host's bundle is bind-mounted over the base's during RUN steps only
# (-v over an existing file: nothing of it lands in a layer), and the base's /etc/pip.conf points
# pip at that path, so the images themselves keep Debian's CA list.
TRUST=()
host_trust() {
    local bundle=${HOST_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
    [[ -r $bundle ]] && TRUST=(-v "$bundle:/etc/ssl/certs/ca-certificates.crt:ro")
    return 0
}

main() {
    local what=${1:-all} base
    need_root
    ensure_tools
    host_trust
    base=$(ensure_base)
    case $what in
        base) ;;
        operator) build_image localhost/lorakube-operator Dockerfile "$base" ;;
        trainer) build_image localhost/lorakube-trainer trainer_image/Dockerfile "$base" ;;
        all)
            build_image localhost/lorakube-operator Dockerfile "$base"
            build_image localhost/lorakube-trainer trainer_image/Dockerfile "$base"
            ;;
        *) echo "images.sh: unknown target '$what' (base, operator, trainer or all)" >&2; exit 2 ;;
    esac
    "${BUILDAH[@]}" images
}

# On one line: bash reads a script as it runs it, so an edit during a long build cannot run half.
main "$@"; exit

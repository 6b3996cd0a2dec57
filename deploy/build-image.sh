#!/usr/bin/env bash
# Build the runtime image without a Docker daemon: buildah with vfs storage (no overlay mounts,
# no daemon), on a Debian bookworm base made with mmdebstrap (no image registry is needed).
#
#   deploy/build-image.sh            # -> image localhost/openpto:latest in buildah's storage
#   WHEELS=/opt/wheels deploy/build-image.sh   # torch from a local folder of wheels
#
# Each step prints what it does, so a failure names the step it stopped at.
set -euo pipefail
cd "$(dirname "$0")/.."

export STORAGE_DRIVER=vfs BUILDAH_ISOLATION=chroot
BASE=${BASE:-localhost/openpto-base:bookworm}
IMAGE=${IMAGE:-localhost/openpto:latest}
TARGET=${TARGET:-runtime}
WHEELS=${WHEELS:-}
# A build machine whose TLS traffic goes through a proxy with its own CA passes that bundle.
CA_BUNDLE=${CA_BUNDLE:-}
SUITE=${SUITE:-bookworm}

step() { printf '== %s\n' "$*" >&2; }

for tool in buildah mmdebstrap; do
    command -v "$tool" >/dev/null || { echo "missing: $tool (apt-get install buildah mmdebstrap)" >&2; exit 2; }
done

if ! buildah inspect --type image "$BASE" >/dev/null 2>&1; then
    step "base: mmdebstrap $SUITE with python3 -> $BASE"
    rootfs=$(mktemp --suffix=.tar)
    trap 'rm -f "$rootfs"' EXIT
    mmdebstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        "$SUITE" "$rootfs"
    ctr=$(buildah from scratch)
    buildah add "$ctr" "$rootfs" /
    buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$ctr"
    buildah commit --rm "$ctr" "$BASE"
fi

# buildah 1.28 (Debian 12) does not resolve a stage named through an ARG (`FROM base-${CUDA}`)
# as a stage: it looks for an image of that name. The CPU stage is named directly here, and the
# CUDA stage, which it may still build, gets the local base too (nothing is pulled).
dockerfile=$(mktemp --suffix=.Dockerfile)
trap 'rm -f "$dockerfile"' EXIT
sed 's/^FROM base-${CUDA} AS base$/FROM base-0 AS base/' Dockerfile > "$dockerfile"
args=(--format docker --layers --target "$TARGET" --build-arg "CPU_BASE=$BASE" --build-arg "CUDA_BASE=$BASE"
      -f "$dockerfile" -t "$IMAGE")
if [ -n "$WHEELS" ]; then
    # torch's own index is not reachable from every build machine: the wheel comes from here.
    args+=(-v "$WHEELS:/wheels:ro" --build-arg PIP_FIND_LINKS=/wheels
           --build-arg TORCH_CPU_INDEX=https://pypi.org/simple)
fi
if [ -n "$CA_BUNDLE" ]; then
    args+=(-v "$CA_BUNDLE:/run/build-ca.crt:ro" --build-arg PIP_CERT=/run/build-ca.crt)
fi
step "build: buildah bud ${args[*]} ."
buildah bud "${args[@]}" .
step "built $IMAGE"
buildah images "$IMAGE"

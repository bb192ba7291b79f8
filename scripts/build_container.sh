#!/usr/bin/env bash
# Build corolla's container image on this machine without Docker (buildah, vfs storage, chroot
# isolation) and check it end to end:
#
#   1. base    a local Debian 12 + Python 3.11 base image made with debootstrap (kept between runs)
#   2. build   the project's Dockerfile on it (--build-arg BASE_IMAGE=...), CPU torch from the
#              local wheel mirror that pip is configured with here
#   3. inspect the image's metadata (entrypoint, user, volume, healthcheck, ports) and
#              `corolla serve --help` inside it
#   4. serve   `corolla serve` of a tiny random Llama inside the container, until it is ready;
#              the image's health check run inside the container
#   5. client  a client outside the container (this repository's .venv) generates greedily
#              through it: token ids must equal local transformers' exactly
#
# Needs root, buildah and debootstrap (apt-get install -y buildah debootstrap) and `make setup`
# (.venv). Prints each phase's time. Re-running reuses the base image and buildah's layer cache.
#
# Environment (all optional):
#   COROLLA_BASE_IMAGE   base image to build on (default: the local Debian one, built if missing)
#   COROLLA_IMAGE        tag of the image built (default localhost/corolla:dev)
#   COROLLA_BUILD_ARGS   more arguments for `buildah bud`, e.g. "--build-arg TORCH_INDEX_URL=..."
#   REBUILD_BASE=1       rebuild the local base image even if it exists
#   DEBIAN_MIRROR        for debootstrap (default http://deb.debian.org/debian)
#   PIP_FIND_LINKS, PIP_EXTRA_INDEX_URL, PIP_CERT
#                        passed to pip inside the build (default: this machine's pip config);
#                        local directories and the CA file are mounted read-only into the build
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

BASE_IMAGE=${COROLLA_BASE_IMAGE:-localhost/corolla-python-base:bookworm}
IMAGE=${COROLLA_IMAGE:-localhost/corolla:dev}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
HOST_PYTHON=$ROOT/.venv/bin/python
READY_TIMEOUT=${READY_TIMEOUT:-240}

bh() { buildah --storage-driver vfs "$@"; }
say() { printf '\n=== %s\n' "$*"; }
die() { printf 'build_container.sh: %s\n' "$*" >&2; exit 1; }

for tool in buildah debootstrap; do
    command -v "$tool" >/dev/null || die "$tool is missing: apt-get install -y buildah debootstrap"
done
[ "$(id -u)" = 0 ] || die "run as root (debootstrap and buildah's vfs storage need it)"
[ -x "$HOST_PYTHON" ] || die "$HOST_PYTHON is missing: run 'make setup' first"

WORK=$(mktemp -d /tmp/corolla-container.XXXXXX)
CONTAINERS=()
SERVER_PID=
PHASES=()
T_ALL=$(date +%s.%N)
T_PHASE=

cleanup() {
    local status=$?
    if [ -n "$SERVER_PID" ]; then      # the process group of the container's `buildah run`
        kill -TERM -- "-$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 50); do pgrep -g "$SERVER_PID" >/dev/null || break; sleep 0.2; done
        kill -KILL -- "-$SERVER_PID" 2>/dev/null || true
    fi
    for ctr in "${CONTAINERS[@]}"; do
        bh umount "$ctr" >/dev/null 2>&1 || true
        bh rm "$ctr" >/dev/null 2>&1 || true
    done
    rm -rf "$WORK"
    if [ "$status" != 0 ]; then
        printf '\nFAILED (exit status %s)\n' "$status" >&2
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

since() { awk -v now="$(date +%s.%N)" -v then="$1" 'BEGIN { printf "%.1f", now - then }'; }
phase() { say "$1"; T_PHASE=$(date +%s.%N); PHASE_NAME=$1; }
phase_done() {
    local took
    took=$(since "$T_PHASE")
    PHASES+=("$(printf '%-60s %7s s' "$PHASE_NAME" "$took")")
    echo "--- $PHASE_NAME: ${took} s"
}

# ---------------------------------------------------------------------------------------------
phase "1. base image $BASE_IMAGE"
if [ "$BASE_IMAGE" != localhost/corolla-python-base:bookworm ]; then
    echo "using $BASE_IMAGE as given (COROLLA_BASE_IMAGE)"
elif [ -z "${REBUILD_BASE:-}" ] && bh inspect --type image "$BASE_IMAGE" >/dev/null 2>&1; then
    echo "cached (REBUILD_BASE=1 rebuilds it)"
else
    rootfs=$WORK/rootfs
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$rootfs" "$DEBIAN_MIRROR" > "$WORK/debootstrap.log" 2>&1 \
        || { tail -20 "$WORK/debootstrap.log"; die "debootstrap failed"; }
    # lean: no package lists, downloaded .debs, docs, manuals or translations
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
        "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
        "$rootfs"/usr/share/locale/* "$rootfs"/var/log/*.log
    ctr=$(bh from --name "corolla-base-$$" scratch)
    CONTAINERS+=("$ctr")
    mnt=$(bh mount "$ctr")
    tar -C "$rootfs" --numeric-owner -cf - . | tar -C "$mnt" --numeric-owner -xpf -
    bh umount "$ctr" >/dev/null
    bh config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        --env LANG=C.UTF-8 --cmd /bin/bash \
        --label org.opencontainers.image.description="Debian 12 minbase + python3 (debootstrap)" "$ctr"
    bh commit --quiet --format docker "$ctr" "$BASE_IMAGE" >/dev/null
    bh rm "$ctr" >/dev/null
    CONTAINERS=()
    rm -rf "$rootfs"
    echo "built with debootstrap from $DEBIAN_MIRROR"
fi
bh images --format '{{.Name}}:{{.Tag}}  {{.Size}}' "$BASE_IMAGE"
phase_done

# ---------------------------------------------------------------------------------------------
phase "2. build $IMAGE (Dockerfile, BASE_IMAGE=$BASE_IMAGE)"
pip_config() { "$ROOT/.venv/bin/pip" config get "$1" 2>/dev/null || true; }
FIND_LINKS=${PIP_FIND_LINKS-$(pip_config global.find-links)}
EXTRA_INDEX=${PIP_EXTRA_INDEX_URL-$(pip_config global.extra-index-url)}
VOLUMES=()
for location in $FIND_LINKS $EXTRA_INDEX; do
    dir=${location#file://}
    [ -d "$dir" ] || continue                  # a URL: reachable from the build as from here
    [ "$(basename "$dir")" = simple ] && dir=$(dirname "$dir")   # an index links to ../../files
    VOLUMES+=(--volume "$dir:$dir:ro")
done
CERT=${PIP_CERT-$(pip_config global.cert)}      # e.g. the CA of a TLS-intercepting proxy
if [ -n "$CERT" ]; then
    VOLUMES+=(--volume "$CERT:$CERT:ro")
fi
echo "pip inside the build: find-links='$FIND_LINKS' extra-index-url='$EXTRA_INDEX' cert='$CERT'"
set +e
bh bud --isolation chroot --layers --force-rm --format docker --pull=never \
    --build-arg "BASE_IMAGE=$BASE_IMAGE" \
    --build-arg "PIP_FIND_LINKS=$FIND_LINKS" \
    --build-arg "PIP_EXTRA_INDEX_URL=$EXTRA_INDEX" \
    --build-arg "PIP_CERT=$CERT" \
    "${VOLUMES[@]}" ${COROLLA_BUILD_ARGS:-} --tag "$IMAGE" --file Dockerfile . 2>&1 | tee "$WORK/build.log" \
    | grep -E '^(STEP|COMMIT|Successfully|Error|error)|Using cache|^keeping|^torch==|^corolla ready|Successfully installed' \
    | cut -c1-200
build_status=${PIPESTATUS[0]}
set -e
[ "$build_status" = 0 ] || { tail -30 "$WORK/build.log"; die "the image build failed"; }
IMAGE_SIZE=$(bh images --format '{{.Size}}' "$IMAGE" | head -1)
echo "image $IMAGE: $IMAGE_SIZE"
# vfs keeps a full copy of the file system per layer: remove earlier builds' images. Their chains
# end in a dangling image (untagged, no children); this build's steps, the layer cache, are kept.
removed=0
for _ in $(seq 50); do
    stale=$(bh images --filter dangling=true --filter label=org.opencontainers.image.title=corolla \
        --format '{{.ID}}')
    [ -n "$stale" ] || break
    for id in $stale; do bh rmi "$id" >/dev/null && removed=$((removed + 1)); done
done
[ "$removed" = 0 ] || echo "removed $removed images of earlier builds"
phase_done

# ---------------------------------------------------------------------------------------------
phase "3. inspect the image, corolla serve --help inside it"
bh inspect --type image "$IMAGE" > "$WORK/inspect.json"
"$HOST_PYTHON" - "$WORK/inspect.json" <<'PY'
import json, sys
config = json.load(open(sys.argv[1]))["Docker"]["config"]  # the Docker-format image config
checks = {
    "entrypoint is corolla": config.get("Entrypoint") == ["corolla"],
    "default command is serve": config.get("Cmd") == ["serve"],
    "runs as a non-root user": config.get("User") not in (None, "", "0", "root"),
    "/cache is a volume": "/cache" in (config.get("Volumes") or {}),
    "COROLLA_CACHE_DIR=/cache": "COROLLA_CACHE_DIR=/cache" in config.get("Env", []),
    "has a health check": bool((config.get("Healthcheck") or {}).get("Test")),
    "exposes 31337/tcp": "31337/tcp" in (config.get("ExposedPorts") or {}),
}
for name, ok in checks.items():
    print(f"{'ok  ' if ok else 'FAIL'} {name}")
print("healthcheck:", config.get("Healthcheck"))
sys.exit(0 if all(checks.values()) else "the image's metadata is not as expected")
PY
CTR=$(bh from --pull=never --name "corolla-check-$$" "$IMAGE")
CONTAINERS+=("$CTR")
crun() { bh run --isolation chroot "$@"; }
echo "user inside: $(crun "$CTR" -- id)"
crun "$CTR" -- python -c 'import sys, torch, corolla; print("python", sys.version.split()[0], "torch", torch.__version__)'
crun "$CTR" -- corolla serve --help > "$WORK/help.txt"
head -3 "$WORK/help.txt"
grep -q -- "--initial_peers" "$WORK/help.txt" || die "corolla serve --help lists no --initial_peers"
echo "... ($(wc -l < "$WORK/help.txt") lines)"
phase_done

# ---------------------------------------------------------------------------------------------
phase "4. corolla serve of a tiny model inside the container"
MODEL=$WORK/model
mkdir -p "$MODEL" && chmod 755 "$WORK" "$MODEL"
"$HOST_PYTHON" scripts/container/tiny_model.py "$MODEL"
METRICS_PORT=$("$HOST_PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# chroot isolation shares this machine's network: serve on loopback. Two flags come from
# COROLLA_* variables, as a volunteer's would; --throughput 1 skips the benchmark.
setsid buildah --storage-driver vfs run --isolation chroot --volume "$MODEL:/model:ro" \
    --env COROLLA_THROUGHPUT=1 --env "COROLLA_METRICS_PORT=$METRICS_PORT" --env HF_HUB_OFFLINE=1 \
    "$CTR" -- corolla serve /model --new_swarm --host_maddrs /ip4/127.0.0.1/tcp/0 --device cpu \
    --public_name container-check > "$WORK/serve.log" 2>&1 &
SERVER_PID=$!
MADDR=
for _ in $(seq $((READY_TIMEOUT * 5))); do
    MADDR=$(grep -oE -- '--initial_peers /[^ ]+' "$WORK/serve.log" | head -1 | cut -d' ' -f2 || true)
    [ -n "$MADDR" ] && break
    kill -0 "$SERVER_PID" 2>/dev/null || { cat "$WORK/serve.log"; die "the server exited before it was ready"; }
    sleep 0.2
done
[ -n "$MADDR" ] || { tail -30 "$WORK/serve.log"; die "the server was not ready after ${READY_TIMEOUT} s"; }
grep -E 'ready:' "$WORK/serve.log" | sed 's/^/  /' | cut -c1-200
echo "server in the container: $MADDR (metrics on $METRICS_PORT)"
phase_done

phase "4b. the image's health check, inside the container"
crun "$CTR" -- corolla-healthcheck --verbose
phase_done

# ---------------------------------------------------------------------------------------------
phase "5. client outside the container vs local transformers"
"$HOST_PYTHON" scripts/container/check_generation.py "$MODEL" "$MADDR"
phase_done

phase "6. stop the server (SIGTERM to corolla inside, as docker stop does)"
# the oldest corolla process of the run (its DHT child has the same command line); buildah run
# then exits with corolla's own exit status
MAIN_PID=$(pgrep -o -g "$SERVER_PID" -f '^/opt/corolla/bin/python[0-9.]* /opt/corolla/bin/corolla serve' || true)
[ -n "$MAIN_PID" ] || die "cannot find the corolla process of the container"
kill -TERM "$MAIN_PID"
for _ in $(seq 100); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.2; done
kill -0 "$SERVER_PID" 2>/dev/null && die "the server did not stop within 20 s of SIGTERM"
serve_status=0
wait "$SERVER_PID" || serve_status=$?
sleep 1
LEFT=$(pgrep -g "$SERVER_PID" || true)      # the P2P daemon and the DHT process share the group
[ -z "$LEFT" ] || die "processes of the container still run after it stopped: $(echo $LEFT)"
SERVER_PID=
grep -E 'SIGTERM|OFFLINE|shutting down' "$WORK/serve.log" | tail -3 | sed 's/^/  /' | cut -c1-200 || true
[ "$serve_status" = 0 ] || { tail -20 "$WORK/serve.log"; die "corolla serve exited with status $serve_status"; }
echo "corolla serve exited with status 0; nothing of the container left running"
phase_done

say "summary"
printf '%s\n' "${PHASES[@]}"
printf '%-60s %7s s\n' "total" "$(since "$T_ALL")"
echo "image: $IMAGE ($IMAGE_SIZE), base: $BASE_IMAGE"
echo "OK"

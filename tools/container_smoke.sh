#!/usr/bin/env bash
# Builds the search service's image and smoke-tests it as a shop would run it (not part of `make test`:
# the build takes minutes). Prints the image size and how long start-up to ready takes (BENCHMARKS.md).
#
#   tools/container_smoke.sh [EXPORT_BASE [INDEX_BASE]]     # defaults: demo-output/exports demo-output/index-trained
#
# The container embeds in process (STREET2SHOP_MODEL: the export base mounted read-only), serves the index
# base mounted read-only, and the catalogue photos mounted at the paths the index names. Checked: /readyz,
# a search with a real photo, its catalogue image, a bad upload refused with 400, a new index version
# picked up without a restart, the HEALTHCHECK, a non-root user, a clean stop on SIGTERM; then the
# start-up is timed again STARTS times. The index base is copied first (the new version goes in the copy).
#
# Environment:
#   ENGINE      podman or docker (default: whichever is installed, podman first)
#   BASE_IMAGE  the image's base (default: localhost/debian:bookworm-local, see tools/container_base.sh;
#               python:3.11-slim where a registry can be reached)
#   IMAGE       the tag to build (default: street2shop-search:smoke); BUILD=0 uses it as already built
#   CA_BUNDLE   a CA bundle for pip behind a TLS-intercepting proxy, passed as a build secret
#   PHOTO       the photo to search (default: the first street photo beside the index base: DIR/data/images/street)
#   CATALOGUE   the folder of the catalogue photos (default: DIR/data beside the index base)
#   PORT        the port the service listens on, on the host network (default: 18080)
#   STARTS      extra timed start-ups after the checks (default: 2)
#   COMPARE_PYTHON  a Python with street2shop[service]: also time the service started on the host, in turn
set -euo pipefail

die() { echo "container_smoke.sh: $*" >&2; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

EXPORT_BASE=$(realpath "${1:-demo-output/exports}")
INDEX_BASE=$(realpath "${2:-demo-output/index-trained}")
HERE=$(dirname "$INDEX_BASE")
ENGINE=${ENGINE:-$(command -v podman || command -v docker || true)}
BASE_IMAGE=${BASE_IMAGE:-localhost/debian:bookworm-local}
IMAGE=${IMAGE:-street2shop-search:smoke}
PHOTO=${PHOTO:-$(ls "$HERE"/data/images/street/*.jpg 2>/dev/null | head -n 1 || true)}
CATALOGUE=$(realpath "${CATALOGUE:-$HERE/data}")
PORT=${PORT:-18080}
STARTS=${STARTS:-2}
URL="http://127.0.0.1:$PORT"

[ -n "$ENGINE" ] || die "needs podman or docker"
[ -d "$EXPORT_BASE" ] || die "no export base at $EXPORT_BASE (make demo makes one; or give EXPORT_BASE INDEX_BASE)"
[ -d "$INDEX_BASE" ] || die "no index base at $INDEX_BASE"
[ -f "$PHOTO" ] || die "no photo to search: set PHOTO=path/to/photo.jpg"
! curl -s -o /dev/null "$URL/healthz" || die "port $PORT is taken; set PORT"
case "$(basename "$ENGINE")" in podman*) PODMAN=1 ;; *) PODMAN=0 ;; esac

work=$(mktemp -d)
name="street2shop-smoke-$$"
cleanup() { "$ENGINE" rm -f "$name" >/dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT
cd "$(dirname "$0")/.."

# 1. Build (the same command as `make image`, on the local base).
if [ "${BUILD:-1}" != 0 ]; then
    flags=(--network host --build-arg "BASE_IMAGE=$BASE_IMAGE")
    [ "$PODMAN" = 1 ] && flags+=(--format docker)                 # HEALTHCHECK is a Docker-format field
    [ -n "${CA_BUNDLE:-}" ] && flags+=(--secret "id=ca-bundle,src=$CA_BUNDLE")
    echo "building $IMAGE on $BASE_IMAGE with $(basename "$ENGINE") (log: $work/build.log) ..."
    t=$(now)
    "$ENGINE" build "${flags[@]}" -f deploy/Containerfile -t "$IMAGE" . >"$work/build.log" 2>&1 \
        || { tail -n 40 "$work/build.log"; die "the build failed"; }
    build_s=$(since "$t")
fi
size=$("$ENGINE" image inspect --format '{{.Size}}' "$IMAGE")

# 2. Start it: the export and the index base read-only, the catalogue photos where the index says they are.
cp -a "$INDEX_BASE" "$work/index"
start() {
    "$ENGINE" run -d --name "$name" --network host --read-only --tmpfs /tmp:rw,size=256m \
        -e STREET2SHOP_PORT="$PORT" -e STREET2SHOP_MODEL=/models/street2shop -e STREET2SHOP_POLL_SECONDS=1 \
        -v "$EXPORT_BASE:/models/street2shop:ro" -v "$work/index:/index:ro" -v "$CATALOGUE:$CATALOGUE:ro" \
        "$IMAGE" >/dev/null 2>"$work/run.err" || { cat "$work/run.err"; die "the container did not start"; }
}
running() { [ "$("$ENGINE" inspect --format '{{.State.Running}}' "$name")" = true ] || { "$ENGINE" logs "$name" 2>&1 | tail -n 30 >&2; false; }; }
wait_ready() {  # prints seconds from $1 to the first 200 of /readyz; $2: a command that fails once the service is gone
    until curl -fs -o /dev/null "$URL/readyz"; do
        $2 || die "the service stopped before it was ready"
        awk -v s="$(since "$1")" 'BEGIN { exit !(s > 300) }' && die "not ready after 300 s: $(curl -s "$URL/readyz")"
        sleep 0.2
    done
    since "$1"
}
field() { python3 -c "import json, sys; d = json.load(open(sys.argv[1])); print(eval(sys.argv[2], {}, {'d': d}))" "$@"; }

t=$(now); start; ready_s=$(wait_ready "$t" running)
echo "ready after $ready_s s: $(curl -s "$URL/readyz")"

# 3. A search with a real photo, and the catalogue image of its best product.
code=$(curl -s -o "$work/search.json" -w '%{http_code}' -F "image=@$PHOTO" -F k=5 "$URL/v1/search")
[ "$code" = 200 ] || die "search answered $code: $(cat "$work/search.json")"
[ "$(field "$work/search.json" 'len(d["results"])')" = 5 ] || die "search gave not 5 results: $(cat "$work/search.json")"
version=$(field "$work/search.json" 'd["index_version"]')
echo "search $(basename "$PHOTO"): $(field "$work/search.json" '", ".join("%s %.3f" % (r["product_id"], r["similarity"]) for r in d["results"])'); index version $version; $(field "$work/search.json" 'd["timings"]')"
image_url=$(field "$work/search.json" 'd["results"][0]["image_url"]')
code=$(curl -s -o /dev/null -w '%{http_code} %{content_type}' "$URL$image_url")
[[ "$code" == "200 image/"* ]] || die "catalogue image $image_url answered $code"
echo "catalogue image $image_url: $code"

# 4. A bad upload is refused, and the service keeps serving.
printf 'not a photo' >"$work/bad.jpg"
code=$(curl -s -o "$work/bad.json" -w '%{http_code}' -F "image=@$work/bad.jpg" "$URL/v1/search")
[ "$code" = 400 ] || die "a bad upload answered $code: $(cat "$work/bad.json")"
echo "bad upload: $code $(cat "$work/bad.json")"

# 5. A new index version under the mounted base is served without a restart (published as index build does:
#    written to a hidden folder, then renamed into place).
next=$((version + 1))
cp -a "$work/index/$version" "$work/index/.smoke-$next" && mv "$work/index/.smoke-$next" "$work/index/$next"
t=$(now)
until [ "$(curl -s -o "$work/search.json" -w '%{http_code}' -F "image=@$PHOTO" -F k=5 "$URL/v1/search")" = 200 ] \
        && [ "$(field "$work/search.json" 'd["index_version"]')" = "$next" ]; do
    awk -v s="$(since "$t")" 'BEGIN { exit !(s > 30) }' && die "index version $next not served after 30 s"
    sleep 0.2
done
echo "index version $next served $(since "$t") s after it was published, without a restart"

# 6. The HEALTHCHECK, the user, a clean stop.
if [ "$PODMAN" = 1 ]; then
    "$ENGINE" healthcheck run "$name" >/dev/null 2>&1 || die "the HEALTHCHECK failed"
    health=healthy
else
    health=$("$ENGINE" inspect --format '{{.State.Health.Status}}' "$name")
fi
uid=$("$ENGINE" exec "$name" id -u)
[ "$uid" != 0 ] || die "the service runs as root"
peak_mb=$("$ENGINE" exec "$name" sh -c 'grep VmHWM /proc/1/status' | awk '{ printf "%.0f", $2 / 1024 }')
t=$(now); "$ENGINE" stop -t 30 "$name" >/dev/null 2>&1; stop_s=$(since "$t")
exit_code=$("$ENGINE" inspect --format '{{.State.ExitCode}}' "$name")
echo "HEALTHCHECK: $health; runs as uid $uid; peak memory $peak_mb MB; stopped on SIGTERM in $stop_s s (exit $exit_code)"
"$ENGINE" rm -f "$name" >/dev/null 2>&1

# 7. Start-up again (the image's files now in the page cache), and, with COMPARE_PYTHON, the same service
#    started on the host in turn (the same export and index): what the container adds to start-up.
again=() host=()
host_alive() { kill -0 "$host_pid" 2>/dev/null; }
for _ in $(seq "$STARTS"); do
    t=$(now); start; again+=("$(wait_ready "$t" running)"); "$ENGINE" rm -f "$name" >/dev/null 2>&1
    if [ -n "${COMPARE_PYTHON:-}" ]; then
        t=$(now)
        TF_CPP_MIN_LOG_LEVEL=2 "$COMPARE_PYTHON" -m street2shop service --index "$work/index" --model "$EXPORT_BASE" \
            --port "$PORT" >"$work/host.log" 2>&1 &
        host_pid=$!
        host+=("$(wait_ready "$t" host_alive)"); kill "$host_pid"; wait "$host_pid" 2>/dev/null || true
    fi
done

echo
echo "image:             $IMAGE on $BASE_IMAGE, $(awk -v b="$size" 'BEGIN { printf "%.2f GB", b / 1e9 }')${build_s:+, built in $build_s s}"
echo "start-up to ready: $ready_s s (first start)${again[*]:+; again: ${again[*]} s} (container start → /readyz 200, model in process)"
[ -z "${host[*]}" ] || echo "on the host:       ${host[*]} s (the same service, export and index; started in turn with the container)"
echo "peak memory:       $peak_mb MB (the service process, after the searches)"
echo "checks passed:     /readyz, search, catalogue image, bad upload 400, new index version live, HEALTHCHECK, non-root, SIGTERM"

#!/usr/bin/env bash
# Start the image built by deploy/build-image.sh (buildah, vfs storage, no daemon), read /health
# until it says ok, send one authenticated completion, check that a request without the key is
# refused, then stop it. The container shares this machine's network (chroot isolation), so the
# server listens on loopback here; in Docker or Podman the image's CMD listens on 0.0.0.0.
set -euo pipefail
export STORAGE_DRIVER=vfs BUILDAH_ISOLATION=chroot
IMAGE=${IMAGE:-localhost/openpto:latest}
PORT=${PORT:-18000}
KEY=${KEY:-$(python3 -c 'import secrets; print(secrets.token_hex(16))')}
url="http://127.0.0.1:$PORT"

ctr=$(buildah from "$IMAGE")
log=$(mktemp)
cleanup() {
    if [ -n "${pid:-}" ]; then
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    fi
    buildah rm "$ctr" >/dev/null
    rm -f "$log"
}
trap cleanup EXIT
echo "== run $IMAGE ($ctr): opt serve on $url" >&2
buildah run --user 10001:10001 --env "OPT_API_KEY=$KEY" "$ctr" -- \
    opt serve --host 127.0.0.1 --port "$PORT" >"$log" 2>&1 &
pid=$!

python3 - "$url" "$KEY" <<'PY'
import json, sys, time, urllib.error, urllib.request
url, key = sys.argv[1], sys.argv[2]
started = time.monotonic()
while True:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as reply:
            health = json.load(reply)
            break
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        if time.monotonic() - started > 300:
            sys.exit("no healthy /health in 300 s")
        time.sleep(0.5)
print(f"/health: {health} after {time.monotonic() - started:.1f} s")
body = json.dumps({"model": health["model"], "prompt": "The capital of France is",
                   "max_tokens": 8, "temperature": 0}).encode()
request = urllib.request.Request(url + "/v1/completions", body, method="POST", headers={
    "Content-Type": "application/json", "Authorization": f"Bearer {key}"})
with urllib.request.urlopen(request, timeout=120) as reply:
    completion = json.load(reply)
print("completion:", repr(completion["choices"][0]["text"]), completion["usage"])
try:
    urllib.request.urlopen(urllib.request.Request(url + "/v1/models"), timeout=10)
    sys.exit("a request without the key was served")
except urllib.error.HTTPError as exc:
    assert exc.code == 401, exc.code
    print("without the key: 401")
PY
# The image's own HEALTHCHECK command, run inside the container as Docker would run it (with
# this check's port: the container shares this machine's network, where 8000 may be taken).
mapfile -t check < <(buildah inspect --type image "$IMAGE" | python3 -c '
import json, sys
test = json.load(sys.stdin)["Docker"]["config"]["Healthcheck"]["Test"]
assert test[0] == "CMD", test
print("\n".join(arg.replace(":8000/", ":" + sys.argv[1] + "/") for arg in test[1:]))' "$PORT")
echo "== HEALTHCHECK ${check[*]}" >&2
buildah run --user 10001:10001 "$ctr" -- "${check[@]}"
echo "== HEALTHCHECK: healthy" >&2
# The image's CMD listens on 0.0.0.0: without a key it must refuse to start.
if refusal=$(buildah run --user 10001:10001 "$ctr" -- opt serve --host 0.0.0.0 --port "$((PORT + 1))" 2>&1); then
    echo "the image served on 0.0.0.0 without a key" >&2; exit 1
fi
grep -q "refusing to listen on 0.0.0.0 without an API key" <<<"$refusal"
echo "== without a key on 0.0.0.0: refused ($refusal)" >&2
echo "== the image serves: ok" >&2
grep -v "$KEY" "$log" | tail -5 >&2 || true

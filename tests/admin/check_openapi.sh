#!/usr/bin/env bash
# Runs schemathesis against a live admin listener with the admin API's own
# OpenAPI document (docs/admin-openapi.json, as GET /v1/openapi.json serves it): every answer must conform to
# it (documented status, content type, schema) and none may be a 500.
# Usage: tests/admin/check_openapi.sh BINARY SCHEMATHESIS [extra schemathesis args]
set -euo pipefail
binary=$1 schemathesis=$2
shift 2
cd "$(dirname "$0")/../.."
schemathesis=$(realpath -s "$schemathesis")

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
proxy=$(free_port) admin=$(free_port)
token="schemathesis-$(date +%s%N)"
digest=$(printf %s "$token" | sha256sum | cut -d' ' -f1)
dir=$(mktemp -d)
trap 'kill "$pid" 2>/dev/null || true; rm -rf "$dir"' EXIT
cat >"$dir/tollgate.toml" <<TOML
[server]
listen = "127.0.0.1:$proxy"
[admin]
listen = "127.0.0.1:$admin"
tokens = [{ sha256 = "$digest", name = "schemathesis" }]
[identity.api_key]
keys = []
[upstreams.api]
url = "http://127.0.0.1:9"
[[routes]]
name = "runs"
method = "POST"
path = "/runs"
upstream = "api"
cost = { playbook_runs = 1 }
[plans.free]
tokens = 100000
playbook_runs = 10
[plans.pro]
tokens = 5000000
[defaults]
plan = "free"
[orgs.org_acme]
plan = "pro"
TOML
"$binary" run --config "$dir/tollgate.toml" 2>"$dir/stderr.log" &
pid=$!
python3 - "$admin" <<'PY'
import sys, time, urllib.request
deadline = time.monotonic() + 10
while True:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/healthz", timeout=1)
        break
    except OSError:
        if time.monotonic() > deadline:
            sys.exit("the admin listener did not come up")
        time.sleep(0.05)
PY
# The document as served, with the running config's plans in it.
python3 - "$admin" "$token" "$dir/openapi.json" <<'PY'
import sys, urllib.request
request = urllib.request.Request(f"http://127.0.0.1:{sys.argv[1]}/v1/openapi.json",
                                 headers={"Authorization": f"Bearer {sys.argv[2]}"})
open(sys.argv[3], "wb").write(urllib.request.urlopen(request, timeout=5).read())
PY
# From the temporary directory, where schemathesis keeps its cache.
cd "$dir"
"$schemathesis" run "$dir/openapi.json" --url "http://127.0.0.1:$admin" \
  --header "Authorization: Bearer $token" \
  --checks all --max-examples 25 --no-color "$@" \
  --exclude-checks use_after_free `# DELETE .../usage resets the counters; the summary stays` \
  --workers 1 # one thread: CPython 3.11's ast.parse, which the generator calls, is not thread-safe

#!/usr/bin/env bash
# Runs testssl.sh against the gateway binary's TLS listener and fails if it
# offers a protocol below TLS 1.2, a weak cipher category, or anything
# testssl rates MEDIUM, HIGH or CRITICAL.
#
#   tests/tls/check_testssl.sh target/release/tollgate
#
# Needs testssl.sh (Debian: apt-get install testssl.sh), openssl, python3.
set -euo pipefail

binary=${1:?usage: $0 BINARY}
[ -x "$binary" ] || { echo "$binary is not an executable" >&2; exit 2; }
testssl=$(command -v testssl || command -v testssl.sh) || {
    echo "testssl.sh is not installed (apt-get install testssl.sh)" >&2
    exit 2
}

work=$(mktemp -d)
gateway=
cleanup() {
    if [ -n "$gateway" ]; then kill "$gateway" 2>/dev/null || true; wait "$gateway" 2>/dev/null || true; fi
    if [ -n "${KEEP_TESTSSL_OUTPUT:-}" ]; then echo "output kept in $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

# An RSA certificate, the most common kind, so that the RSA-only checks
# (ROBOT, the RSA key exchange suites) have something to probe.
openssl req -x509 -newkey rsa:2048 -nodes -days 365 -subj /CN=localhost \
    -addext subjectAltName=DNS:localhost,IP:127.0.0.1 \
    -keyout "$work/key.pem" -out "$work/cert.pem" 2>/dev/null

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cat > "$work/tollgate.toml" <<TOML
[server]
listen = "127.0.0.1:$port"

[server.tls]
cert = "$work/cert.pem"
key = "$work/key.pem"

[upstreams.api]
url = "http://127.0.0.1:9"

[[routes]]
name = "all"
path = "/{*rest}"
upstream = "api"
TOML

RUST_LOG=warn "$binary" run --config "$work/tollgate.toml" 2>"$work/gateway.log" &
gateway=$!
for _ in $(seq 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then break; fi
    kill -0 "$gateway" 2>/dev/null || { cat "$work/gateway.log" >&2; exit 2; }
    sleep 0.1
done

# Protocols, cipher categories, server defaults and every vulnerability
# check; --fast is not used, as it skips the per-protocol cipher checks.
started=$(date +%s)
"$testssl" --quiet --color 0 --warnings off --openssl-timeout 10 \
    --protocols --std --server-defaults --vulnerable \
    --jsonfile "$work/testssl.json" "127.0.0.1:$port" > "$work/testssl.txt" || true
elapsed=$(( $(date +%s) - started ))
echo "testssl.sh took ${elapsed}s"

kill -0 "$gateway" 2>/dev/null || { echo "the gateway died during the scan" >&2; cat "$work/gateway.log" >&2; exit 1; }

python3 - "$work/testssl.json" <<'PY'
import json, sys

findings = json.load(open(sys.argv[1]))
by_id = {f["id"]: f for f in findings}
failed = []

def offered(finding):
    text = finding["finding"].lower()
    return "not offered" not in text

print("== protocols")
for id in ["SSLv2", "SSLv3", "TLS1", "TLS1_1", "TLS1_2", "TLS1_3"]:
    f = by_id.get(id)
    if f is None:
        failed.append(f"{id}: not tested")
        continue
    print(f"  {id}: {f['finding']}")
    if id in ("SSLv2", "SSLv3", "TLS1", "TLS1_1") and offered(f):
        failed.append(f"{id} is offered")

print("== cipher categories")
weak = {
    "cipherlist_NULL", "cipherlist_aNULL", "cipherlist_EXPORT", "cipherlist_LOW",
    "cipherlist_3DES_IDEA", "cipherlist_OBSOLETED", "cipherlist_AVERAGE",
}
for f in findings:
    if f["id"].startswith("cipherlist_"):
        print(f"  {f['id']}: {f['finding']}")
        if f["id"] in weak and offered(f):
            failed.append(f"{f['id']} is offered: {f['finding']}")
for id in weak & {"cipherlist_NULL", "cipherlist_aNULL", "cipherlist_EXPORT", "cipherlist_LOW", "cipherlist_3DES_IDEA"}:
    if id not in by_id:
        failed.append(f"{id}: not tested")

vulnerabilities = [
    "heartbleed", "CCS", "ticketbleed", "ROBOT", "secure_renego", "secure_client_renego",
    "CRIME_TLS", "BREACH", "POODLE_SSL", "fallback_SCSV", "SWEET32", "FREAK", "DROWN",
    "LOGJAM", "BEAST", "LUCKY13", "RC4",
]
print("== vulnerabilities")
for id in vulnerabilities:
    f = by_id.get(id)
    if f is None:
        continue
    print(f"  {id}: {f['severity']}: {f['finding']}")

# Findings that say nothing about the gateway's TLS: the test certificate
# is self-signed and short-lived, and nothing resolves 127.0.0.1 in DNS.
about_the_test_certificate = (
    "cert_chain_of_trust", "cert_trust", "cert_caIssuers", "cert_crlDistributionPoints",
    "cert_ocspURL", "cert_revocation", "OCSP_stapling", "cert_mustStapleExtension",
    "DNS_CAArecord", "cert_validityPeriod", "cert_expirationStatus", "certs_expiring",
    "cert_extlifeSpan", "cert_certificatePolicies_EV", "cert_notAfter",
)
ignored = []
for f in findings:
    severity = f["severity"]
    if severity not in ("MEDIUM", "HIGH", "CRITICAL", "LOW", "WARN"):
        continue
    line = f"{f['id']}: {severity}: {f['finding']}"
    if f["id"].startswith(about_the_test_certificate):
        ignored.append(f"{line}  [ignored: a property of the self-signed test certificate]")
    elif f["id"] in ("scanProblem", "engine_problem") or severity == "WARN":
        ignored.append(f"{line}  [ignored: a note about the scan itself, not the server]")
    elif severity == "LOW":
        ignored.append(f"{line}  [ignored: LOW, below the MEDIUM threshold]")
    else:
        failed.append(line)

print("== ignored findings")
for line in ignored:
    print(f"  {line}")
print("== result")
if failed:
    for line in failed:
        print(f"  FAIL {line}")
    sys.exit(1)
print("  ok: TLS 1.2 and 1.3 only, no weak cipher category, nothing MEDIUM or worse")
PY

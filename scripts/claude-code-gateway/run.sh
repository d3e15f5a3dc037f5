#!/usr/bin/env bash
# Opt-in check: the REAL Claude Code CLI through llmd's HTTP gateway, offline.
# Claude Code runs with ANTHROPIC_BASE_URL = an api-key profile's gateway URL and the
# gateway key; the fake Anthropic API (tests/src/bin/llmd-fake-providers) must receive its
# requests with the profile's key and never the gateway key. See README.md next to this.
#   CLAUDE_BIN=/path/to/claude scripts/claude-code-gateway/run.sh
# Without CLAUDE_BIN it runs `npm install @anthropic-ai/claude-code@$CLAUDE_CODE_VERSION`
# into its temp folder (about 245 MB). KEEP_TMP=1 keeps the temp folder.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
CLAUDE_CODE_VERSION=${CLAUDE_CODE_VERSION:-2.1.197}
BIN=${LLMD_BIN_DIR:-${CARGO_TARGET_DIR:-$REPO/target}/debug}
CLI_TIMEOUT=${CLI_TIMEOUT:-120}

fail() { echo "FAIL: $*" >&2; exit 1; }
pass() { echo "PASS: $*"; }

for tool in python3 timeout curl; do
    command -v "$tool" >/dev/null || fail "needs $tool on PATH"
done

W=$(mktemp -d "${TMPDIR:-/tmp}/llmd-cc-gateway.XXXXXX")
chmod 700 "$W"
LLMD_PID=""
FAKE_PID=""
cleanup() {
    local rc=$?
    [ -n "$LLMD_PID" ] && kill "$LLMD_PID" 2>/dev/null || true
    exec 3>&- 2>/dev/null || true
    [ -n "$FAKE_PID" ] && kill "$FAKE_PID" 2>/dev/null || true
    wait 2>/dev/null || true
    if [ "$rc" -ne 0 ]; then
        echo "--- llmd log (last 30 lines)" >&2
        tail -n 30 "$W/llmd.log" 2>/dev/null >&2 || true
        echo "--- claude output" >&2
        head -c 2000 "$W/claude.out" 2>/dev/null >&2 || true
    fi
    if [ "${KEEP_TMP:-0}" = 1 ]; then echo "kept $W" >&2; else rm -rf "$W"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Nothing may point either program at real credentials or a real proxy.
unset ANTHROPIC_API_KEY ANTHROPIC_AUTH_TOKEN CLAUDE_CODE_OAUTH_TOKEN CLAUDE_CONFIG_DIR \
      ANTHROPIC_BASE_URL LLMD_CONFIG LLMD_SOCKET \
      HTTPS_PROXY HTTP_PROXY ALL_PROXY https_proxy http_proxy all_proxy

if [ ! -x "$BIN/llmd" ] || [ ! -x "$BIN/llmctl" ] || [ ! -x "$BIN/llmd-fake-providers" ]; then
    (cd "$REPO" && cargo build --workspace --bins) || fail "cargo build failed"
fi
if [ -z "${CLAUDE_BIN:-}" ]; then
    command -v npm >/dev/null || fail "set CLAUDE_BIN or put npm on PATH"
    echo "installing @anthropic-ai/claude-code@$CLAUDE_CODE_VERSION into $W/npm"
    timeout 600 npm install --silent --no-audit --no-fund --prefix "$W/npm" \
        "@anthropic-ai/claude-code@$CLAUDE_CODE_VERSION" >/dev/null \
        || fail "npm install @anthropic-ai/claude-code@$CLAUDE_CODE_VERSION failed"
    CLAUDE_BIN=$W/npm/node_modules/.bin/claude
fi
[ -x "$CLAUDE_BIN" ] || fail "CLAUDE_BIN=$CLAUDE_BIN is not executable"

# ---------------------------------------------------------------- fake Anthropic API
mkfifo "$W/fake.in"
"$BIN/llmd-fake-providers" <"$W/fake.in" >"$W/fake.out" 2>&1 &
FAKE_PID=$!
exec 3>"$W/fake.in"
for _ in $(seq 200); do grep -q ADMIN_URL "$W/fake.out" && break; sleep 0.1; done
FAKE_URL=$(sed -n 's/^FAKE_URL=//p' "$W/fake.out")
ADMIN_URL=$(sed -n 's/^ADMIN_URL=//p' "$W/fake.out")
[ -n "$ADMIN_URL" ] || fail "the fake providers did not start: $(cat "$W/fake.out")"

# ---------------------------------------------------------------- llmd with the gateway
H=$W/home
mkdir -p "$H/.claude" "$W/config/llmd" "$W/state"
mkdir -m 700 "$W/run"
ENVS=(HOME="$H" XDG_CONFIG_HOME="$W/config" XDG_STATE_HOME="$W/state" XDG_RUNTIME_DIR="$W/run")
PROFILE_KEY="sk-ant-api03-profile-$RANDOM$RANDOM"
cat > "$W/config/llmd/config.toml" <<TOML
[gateway]
listen = "127.0.0.1:0"

[profiles.cc]
provider = "anthropic"
auth = "api-key"
api_key_env = "CC_PROFILE_KEY"
base_url = "$FAKE_URL"
TOML
env "${ENVS[@]}" CC_PROFILE_KEY="$PROFILE_KEY" LLMD_LOG=info NO_PROXY='*' \
    "$BIN/llmd" > "$W/llmd.log" 2>&1 &
LLMD_PID=$!
for _ in $(seq 200); do env "${ENVS[@]}" "$BIN/llmctl" status >/dev/null 2>&1 && break; sleep 0.1; done
eval "$(env "${ENVS[@]}" "$BIN/llmctl" env --gateway cc --agent claude-code)"
[ -n "${ANTHROPIC_BASE_URL:-}" ] || fail "llmctl env --gateway cc printed no ANTHROPIC_BASE_URL"
GATEWAY_KEY=$ANTHROPIC_API_KEY
echo "claude: $CLAUDE_BIN ($(HOME="$H" timeout 30 "$CLAUDE_BIN" --version 2>/dev/null | head -n1 || echo '?'))"
echo "gateway: $ANTHROPIC_BASE_URL"

# An onboarded Claude Code home that has approved this key (its last 20 characters).
cat > "$H/.claude.json" <<JSON
{"hasCompletedOnboarding":true,"lastOnboardingVersion":"$CLAUDE_CODE_VERSION","numStartups":5,
 "customApiKeyResponses":{"approved":["${GATEWAY_KEY: -20}"],"rejected":[]},
 "projects":{"$H":{"hasTrustDialogAccepted":true}}}
JSON

# ---------------------------------------------------------------- claude -p hi
rc=0
(cd "$H" && env "${ENVS[@]}" ANTHROPIC_BASE_URL="$ANTHROPIC_BASE_URL" ANTHROPIC_API_KEY="$GATEWAY_KEY" \
    CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1 DISABLE_TELEMETRY=1 DISABLE_AUTOUPDATER=1 \
    DISABLE_ERROR_REPORTING=1 NO_PROXY='*' \
    timeout "$CLI_TIMEOUT" "$CLAUDE_BIN" -p hi) > "$W/claude.out" 2>&1 || rc=$?
[ "$rc" -eq 0 ] || fail "claude -p hi exited $rc"
grep -q "Hello from anthropic" "$W/claude.out" || fail "claude -p hi did not print the fake's answer"

curl -sf "$ADMIN_URL/requests" > "$W/requests.json" || fail "cannot read the fake's record"
python3 - "$W/requests.json" "$PROFILE_KEY" "$GATEWAY_KEY" <<'PY' || fail "the fake saw the wrong credentials"
import json, sys
reqs, profile_key, gateway_key = json.load(open(sys.argv[1])), sys.argv[2], sys.argv[3]
msgs = [r for r in reqs if r["path"].split("?")[0] == "/v1/messages"]
assert msgs, f"no Messages request reached the fake: {[r['path'] for r in reqs]}"
for r in reqs:
    assert not any(gateway_key in v for v in r["headers"].values()), f"gateway key on {r['path']}"
    assert gateway_key not in r["path"]
for r in msgs:
    assert r["headers"].get("x-api-key") == profile_key, r["headers"].get("x-api-key", "")[:12]
    assert r["headers"].get("user-agent", "").startswith("llmd/"), r["headers"].get("user-agent")
print(f"{len(msgs)} Messages request(s), tools offered: {len(msgs[0]['body'].get('tools') or [])}")
PY
status=$(env "${ENVS[@]}" "$BIN/llmctl" status --json)
printf '%s' "$status" | python3 -c 'import json,sys; g=json.load(sys.stdin)["gateway"]; assert g["requests_by_agent"].get("claude-code",0)>0, g' \
    || fail "status does not count Claude Code's requests under its agent key"
pass "claude -p hi through the gateway: every Messages request reached the fake with the profile's key (never the gateway key), counted under agent claude-code"

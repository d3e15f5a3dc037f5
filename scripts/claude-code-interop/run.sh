#!/usr/bin/env bash
# Opt-in interop check: the REAL Claude Code CLI and the REAL llmd share one login, offline.
# See README.md next to this file. Usage:
#   CLAUDE_BIN=/path/to/claude scripts/claude-code-interop/run.sh
# Without CLAUDE_BIN it runs `npm install @anthropic-ai/claude-code@$CLAUDE_CODE_VERSION`
# into its temp folder (about 245 MB). KEEP_TMP=1 keeps the temp folder for inspection.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
CLAUDE_CODE_VERSION=${CLAUDE_CODE_VERSION:-2.1.197}
LLMD_BIN=${LLMD_BIN:-$REPO/target/debug/llmd}
LLMCTL_BIN=${LLMCTL_BIN:-$REPO/target/debug/llmctl}
CLI_TIMEOUT=${CLI_TIMEOUT:-120}

fail() { echo "FAIL: $*" >&2; exit 1; }
pass() { echo "PASS: $*"; }
note() { echo "  .. $*"; }

for tool in python3 openssl timeout; do
    command -v "$tool" >/dev/null || fail "needs $tool on PATH"
done

W=$(mktemp -d "${TMPDIR:-/tmp}/llmd-cc-interop.XXXXXX")
chmod 700 "$W"
PIDS=()
cleanup() {
    local rc=$?
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    if [ "$rc" -ne 0 ]; then
        echo "--- fake server log (last 30 lines): $W/server.log" >&2
        tail -n 30 "$W/server.log" 2>/dev/null | cut -c1-400 >&2 || true
        for f in "$W"/*/llmd.log; do
            [ -f "$f" ] || continue
            echo "--- $f (last 30 lines)" >&2
            tail -n 30 "$f" >&2 || true
        done
    fi
    if [ "${KEEP_TMP:-0}" = 1 ]; then
        echo "kept $W" >&2
    else
        rm -rf "$W"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Never inherit anything that would point either program at real credentials or a real proxy.
unset ANTHROPIC_API_KEY ANTHROPIC_AUTH_TOKEN CLAUDE_CODE_OAUTH_TOKEN CLAUDE_CONFIG_DIR \
      ANTHROPIC_BASE_URL LLMD_CONFIG LLMD_SOCKET \
      HTTPS_PROXY HTTP_PROXY ALL_PROXY https_proxy http_proxy all_proxy NO_PROXY no_proxy

# ---------------------------------------------------------------- binaries
if [ ! -x "$LLMD_BIN" ] || [ ! -x "$LLMCTL_BIN" ]; then
    echo "building llmd and llmctl (cargo build --workspace --bins)"
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
cli_version=$(HOME="$W" timeout 30 "$CLAUDE_BIN" --version 2>/dev/null | head -n1 || true)
echo "claude: $CLAUDE_BIN ($cli_version)"
echo "llmd:   $LLMD_BIN ($("$LLMD_BIN" --version 2>/dev/null || echo '?'))"
case "$cli_version" in
    *"$CLAUDE_CODE_VERSION"*) ;;
    *) echo "warning: expected Claude Code $CLAUDE_CODE_VERSION; the protocol may have changed" >&2 ;;
esac

# ---------------------------------------------------------------- CA + leaf, fake server
mkdir -p "$W/ca"
(
    cd "$W/ca"
    openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 \
        -subj "/CN=llmd interop test CA" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -keyout leaf.key -out leaf.csr \
        -subj "/CN=platform.claude.com" 2>/dev/null
    cat > leaf.ext <<'EOF'
basicConstraints=CA:FALSE
keyUsage=digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=DNS:platform.claude.com,DNS:api.anthropic.com,DNS:claude.ai,DNS:claude.com,DNS:console.anthropic.com,DNS:*.anthropic.com,DNS:*.claude.ai,DNS:*.claude.com,DNS:localhost,IP:127.0.0.1
EOF
    openssl x509 -req -in leaf.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
        -out leaf.pem -days 2 -extfile leaf.ext 2>/dev/null
) || fail "openssl could not make the test CA"

LOG=$W/server.log
CONTROL=$W/control.json
: > "$LOG"
echo '{}' > "$CONTROL"
python3 "$HERE/fakeserver.py" --port 0 --port-file "$W/port" --log "$LOG" \
    --cert "$W/ca/leaf.pem" --key "$W/ca/leaf.key" --control "$CONTROL" \
    2> "$W/fakeserver.err" &
PIDS+=($!)
for _ in $(seq 100); do [ -s "$W/port" ] && break; sleep 0.1; done
[ -s "$W/port" ] || fail "fake server did not start: $(cat "$W/fakeserver.err")"
PORT=$(cat "$W/port")
TOKEN_URL="http://127.0.0.1:$PORT/v1/oauth/token"
echo "fake server: 127.0.0.1:$PORT"

OLD_ACCESS=sk-ant-oat01-ORIGINAL-ACCESS-0000
OLD_REFRESH=sk-ant-ort01-ORIGINAL-REFRESH-0000
# What a real Claude Code login records.
SCOPES_JSON='["user:inference","user:profile","user:sessions:claude_code","user:mcp_servers","user:file_upload"]'

# ---------------------------------------------------------------- helpers

# logq MARK PYTHON: runs PYTHON with `L` = the server log entries after line MARK;
# PYTHON prints its answer. Helpers: token_posts(), messages(), is_llmd(e).
logq() {
    python3 - "$LOG" "$1" "$2" <<'PY'
import json, sys
log, mark, code = sys.argv[1], int(sys.argv[2]), sys.argv[3]
L = [json.loads(l) for i, l in enumerate(open(log)) if i >= mark and l.strip()]
def token_posts(): return [e for e in L if e.get("method") == "POST" and e["path"].split("?")[0].endswith("/v1/oauth/token")]
def messages(): return [e for e in L if e.get("method") == "POST" and e["path"].split("?")[0].endswith("/v1/messages")]
def is_llmd(e): return e.get("user_agent", "").startswith("llmd/")
def replies(): return [e for e in L if "token_reply" in e]
exec(code)
PY
}
log_mark() { wc -l < "$LOG" | tr -d ' '; }

# cred FILE EXPR: evaluates EXPR on the parsed credentials file `c` and prints it.
cred() {
    python3 - "$1" "$2" <<'PY'
import json, sys
c = json.load(open(sys.argv[1]))
print(eval(sys.argv[2]))
PY
}

# new_home NAME EXPIRES_IN_MS: a fake HOME with a Claude Code login and onboarding done.
# Sets H (home), C (its .claude), CRED, and the XDG folders for llmd.
new_home() {
    local name=$1 off=$2
    S=$W/$name
    H=$S/home
    C=$H/.claude
    CRED=$C/.credentials.json
    mkdir -p "$C" "$S/xdg-config/llmd" "$S/xdg-state" "$S/xdg-cache" "$S/xdg-data"
    mkdir -m 700 "$S/xdg-run"
    local exp=$(( $(date +%s%3N) + off ))
    cat > "$CRED" <<EOF
{"claudeAiOauth":{"accessToken":"$OLD_ACCESS","refreshToken":"$OLD_REFRESH","expiresAt":$exp,"scopes":$SCOPES_JSON,"subscriptionType":"max","rateLimitTier":"default_claude_max_20x"},"otherTopLevel":{"keep":"me"}}
EOF
    chmod 600 "$CRED"
    # Environment of every program in this scenario: the fake HOME and XDG folders.
    SENV=(HOME="$H" XDG_CONFIG_HOME="$S/xdg-config" XDG_STATE_HOME="$S/xdg-state"
          XDG_CACHE_HOME="$S/xdg-cache" XDG_DATA_HOME="$S/xdg-data" XDG_RUNTIME_DIR="$S/xdg-run")
    cat > "$H/.claude.json" <<EOF
{"hasCompletedOnboarding":true,"lastOnboardingVersion":"$CLAUDE_CODE_VERSION","numStartups":5,"theme":"dark","bypassPermissionsModeAccepted":true,"oauthAccount":{"accountUuid":"00000000-0000-4000-8000-000000000001","emailAddress":"interop@example.invalid","organizationUuid":"00000000-0000-4000-8000-000000000002","billingType":"stripe_subscription","accountCreatedAt":"2024-01-01T00:00:00Z","subscriptionCreatedAt":"2024-01-01T00:00:00Z"},"projects":{"$H":{"hasTrustDialogAccepted":true}}}
EOF
    cat > "$S/xdg-config/llmd/config.toml" <<EOF
[profiles.claude]
provider = "anthropic"
auth = "claude-cli"
token_endpoint = "$TOKEN_URL"
EOF
}


start_llmd() {
    # llmd talks plain HTTP to the fake directly: no proxy.
    env "${SENV[@]}" LLMD_LOG=info,llmd=debug NO_PROXY='*' \
        "$LLMD_BIN" > "$S/llmd.log" 2>&1 &
    LLMD_PID=$!
    PIDS+=($LLMD_PID)
    local sock=$S/xdg-run/llmd/llmd.sock
    for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.1; done
    [ -S "$sock" ] || fail "llmd did not open $sock (see $S/llmd.log)"
}
stop_llmd() {
    kill "$LLMD_PID" 2>/dev/null || true
    wait "$LLMD_PID" 2>/dev/null || true
}
llmctl() { env "${SENV[@]}" "$LLMCTL_BIN" "$@"; }

# run_claude: `claude -p hi` through the intercepting proxy, cwd = the fake HOME.
run_claude() {
    local rc=0
    (cd "$H" && env "${SENV[@]}" \
        HTTPS_PROXY="http://127.0.0.1:$PORT" HTTP_PROXY="http://127.0.0.1:$PORT" NO_PROXY= \
        NODE_EXTRA_CA_CERTS="$W/ca/ca.pem" \
        CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1 DISABLE_TELEMETRY=1 \
        DISABLE_AUTOUPDATER=1 DISABLE_ERROR_REPORTING=1 \
        timeout "$CLI_TIMEOUT" "$CLAUDE_BIN" -p hi) > "$S/claude.out" 2>&1 || rc=$?
    [ "$rc" -eq 0 ] || fail "claude -p hi exited $rc: $(head -c 600 "$S/claude.out")"
    grep -q "hello from fake" "$S/claude.out" \
        || fail "claude -p hi did not print the fake answer: $(head -c 600 "$S/claude.out")"
}

# wait_for_log SECONDS MARK PYTHON_CONDITION
wait_for_log() {
    local deadline=$((SECONDS + $1)) mark=$2 cond=$3
    while [ "$SECONDS" -lt "$deadline" ]; do
        [ "$(logq "$mark" "print(bool($cond))")" = True ] && return 0
        sleep 0.2
    done
    return 1
}

# ================================================================ (a)
echo "== (a) llmd refreshes an 8-minute login ahead of Claude Code; the CLI uses llmd's token"
new_home a $((8 * 60 * 1000))
m0=$(log_mark)
start_llmd
wait_for_log 20 "$m0" "any(is_llmd(e) for e in token_posts())" \
    || fail "(a) llmd made no refresh request within 20 s"
sleep 1 # let the write-back land and anything else show up
n=$(logq "$m0" "print(len(token_posts()))")
[ "$n" = 1 ] || fail "(a) expected exactly 1 refresh request, the fake saw $n"
logq "$m0" "
e = token_posts()[0]; b = e['body']
assert is_llmd(e), e['user_agent']
assert b['grant_type'] == 'refresh_token' and b['refresh_token'] == '$OLD_REFRESH', b
assert b['client_id'] == '9d1c250a-e61b-44d9-88ed-5944d1962f5e', b
assert sorted(b) == ['client_id', 'grant_type', 'refresh_token', 'scope'], sorted(b)
print(e['user_agent'])" > "$S/ua" || fail "(a) unexpected refresh request (see $LOG)"
LLMD_SCOPE=$(logq "$m0" "print(' '.join(sorted(token_posts()[0]['body'].get('scope', '').split())))")
NEW_A=$(logq "$m0" "print(replies()[0]['access_token'])")
pass "(a) llmd refreshed once, before Claude Code's 5-minute margin (user-agent $(cat "$S/ua"), old refresh token, Claude Code's client id)"

[ "$(cred "$CRED" "c['claudeAiOauth']['accessToken']")" = "$NEW_A" ] \
    || fail "(a) $CRED does not hold llmd's new access token: $(cat "$CRED")"
python3 - "$CRED" "$NEW_A" <<'PY' || fail "(a) credentials file not rewritten as expected: $(cat "$CRED")"
import json, os, stat, sys, time
path, new = sys.argv[1], sys.argv[2]
c = json.load(open(path)); o = c["claudeAiOauth"]
assert o["accessToken"] == new
assert o["refreshToken"] == new.replace("sk-ant-oat01-", "sk-ant-ort01-").replace("-ACCESS-", "-REFRESH-"), o
left = o["expiresAt"] / 1000 - time.time()
assert 3500 < left <= 3600, left
assert o["subscriptionType"] == "max" and o["rateLimitTier"] == "default_claude_max_20x", o
assert o["scopes"] == ["user:inference", "user:profile", "user:sessions:claude_code",
                       "user:mcp_servers", "user:file_upload"], o
assert c["otherTopLevel"] == {"keep": "me"}, c
assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
PY
pass "(a) .credentials.json rewritten: new access+refresh token, expiry +1h, other fields kept, mode 0600"

tok=$(llmctl token claude) || fail "(a) llmctl token claude failed"
[ "$tok" = "$NEW_A" ] || fail "(a) llmctl token claude gave $tok, expected $NEW_A"

m1=$(log_mark)
run_claude
logq "$m1" "
msgs = messages()
assert msgs, 'no Messages request'
bad = [e['authorization'] for e in msgs if e['authorization'] != 'Bearer $NEW_A']
assert not bad, bad
print(msgs[0]['user_agent'])" > "$S/cli-ua" || fail "(a) claude did not send llmd's new token (see $LOG)"
n=$(logq "$m1" "print(len(token_posts()))")
[ "$n" = 0 ] || fail "(a) claude -p hi made $n refresh request(s) of its own"
[ "$(cred "$CRED" "c['claudeAiOauth']['accessToken']")" = "$NEW_A" ] \
    || fail "(a) the credentials file changed during the CLI run"
pass "(a) claude -p hi ($(cat "$S/cli-ua")) sent llmd's new access token and made no refresh request"
stop_llmd

# ================================================================ (b)
echo "== (b) control: a 2-minute login and no llmd — Claude Code refreshes by itself"
new_home b $((2 * 60 * 1000))
m0=$(log_mark)
run_claude
n=$(logq "$m0" "print(len(token_posts()))")
[ "$n" = 1 ] || fail "(b) expected exactly 1 refresh request from the CLI, the fake saw $n"
logq "$m0" "
e = token_posts()[0]; b = e['body']
assert not is_llmd(e), e['user_agent']
assert b['grant_type'] == 'refresh_token' and b['refresh_token'] == '$OLD_REFRESH', b
assert sorted(b) == ['client_id', 'grant_type', 'refresh_token', 'scope'], sorted(b)
assert b['client_id'] == '9d1c250a-e61b-44d9-88ed-5944d1962f5e', b
print(e['user_agent'])" > "$S/ua" || fail "(b) unexpected refresh request (see $LOG)"
CLI_SCOPE=$(logq "$m0" "print(' '.join(sorted(token_posts()[0]['body'].get('scope', '').split())))")
[ "$CLI_SCOPE" = "$LLMD_SCOPE" ] \
    || fail "(b) the CLI refreshed with scopes '$CLI_SCOPE', llmd with '$LLMD_SCOPE'"
NEW_B=$(logq "$m0" "print(replies()[0]['access_token'])")
logq "$m0" "
msgs = messages()
assert msgs and all(e['authorization'] == 'Bearer $NEW_B' for e in msgs), [e['authorization'] for e in msgs]" \
    || fail "(b) the CLI did not use its refreshed token"
[ "$(cred "$CRED" "c['claudeAiOauth']['accessToken']")" = "$NEW_B" ] \
    || fail "(b) the CLI did not write its new token: $(cat "$CRED")"
pass "(b) claude -p hi refreshed by itself (user-agent $(cat "$S/ua")), wrote and used the new token — the fake sees CLI refreshes; same fields, client id and scopes as llmd's refresh"

# ================================================================ (d)
echo "== (d) a login rotated by Claude Code is adopted by a running llmd through its file watcher"
# The login is valid for an hour, so neither program refreshes on its own. The fake rejects
# the access token with a 401, so Claude Code refreshes (its 401 recovery) while llmd runs.
new_home d $((60 * 60 * 1000))
m0=$(log_mark)
start_llmd
tok=$(llmctl token claude) || fail "(d) llmctl token claude failed"
[ "$tok" = "$OLD_ACCESS" ] || fail "(d) llmd serves $tok, expected the file's $OLD_ACCESS"
echo "{\"reject_access_tokens\": [\"$OLD_ACCESS\"]}" > "$CONTROL"
run_claude
echo '{}' > "$CONTROL"
logq "$m0" "
p = token_posts()
assert len(p) == 1 and not is_llmd(p[0]), [e['user_agent'] for e in p]
assert p[0]['body']['refresh_token'] == '$OLD_REFRESH', p[0]['body']
print(p[0]['user_agent'])" > "$S/ua" || fail "(d) expected one refresh, by the CLI (see $LOG)"
NEW_D=$(logq "$m0" "print(replies()[0]['access_token'])")
[ "$(cred "$CRED" "c['claudeAiOauth']['accessToken']")" = "$NEW_D" ] \
    || fail "(d) the CLI did not write its new token: $(cat "$CRED")"
ok=0
for _ in $(seq 50); do
    tok=$(llmctl token claude) || fail "(d) llmctl token claude failed"
    [ "$tok" = "$NEW_D" ] && { ok=1; break; }
    sleep 0.1
done
[ "$ok" = 1 ] || fail "(d) llmd still serves $tok after 5 s, expected the CLI's $NEW_D"
sleep 1
n=$(logq "$m0" "print(sum(1 for e in token_posts() if is_llmd(e)))")
[ "$n" = 0 ] || fail "(d) llmd made $n refresh request(s)"
pass "(d) the CLI rotated the login on a 401 ($(cat "$S/ua")); running llmd now serves the CLI's new token and made no refresh request"
stop_llmd

# ================================================================ (e)
echo "== (e) a follower llmd mirrors the host's login into another Claude Code folder"
MARKER=llmd-mirror-not-a-refresh-token
new_home e-host $((60 * 60 * 1000))
HOST_SENV=("${SENV[@]}")
HOST_SOCK=$S/xdg-run/llmd/llmd.sock
HOST_CRED=$CRED
# The check forces two host refreshes in a row.
sed -i '1i [daemon]\nforced_refresh_interval_secs = 0\n' "$S/xdg-config/llmd/config.toml"
start_llmd
HOST_PID=$LLMD_PID
host_llmctl() { env "${HOST_SENV[@]}" "$LLMCTL_BIN" "$@"; }
new_home e-follower $((60 * 60 * 1000))
# The follower's Claude Code folder holds no login of its own, only other fields.
echo '{"otherTopLevel":{"keep":"me"}}' > "$CRED"
cat > "$S/xdg-config/llmd/config.toml" <<EOF
[profiles.claude]
provider = "anthropic"
auth = "upstream"
upstream_socket = "$HOST_SOCK"
mirror_claude_config_dir = "$C"
EOF
start_llmd
mirror_has() { # ACCESS: waits up to 10 s until the mirror holds ACCESS and the marker
    for _ in $(seq 100); do
        [ "$(cred "$CRED" "c.get('claudeAiOauth', {}).get('accessToken')")" = "$1" ] \
            && [ "$(cred "$CRED" "c['claudeAiOauth'].get('refreshToken')")" = "$MARKER" ] && return 0
        sleep 0.1
    done
    return 1
}
mirror_has "$OLD_ACCESS" || fail "(e) the mirror never got the host's token: $(cat "$CRED")"
python3 - "$CRED" <<'PY' || fail "(e) mirrored file not as expected: $(cat "$CRED")"
import json, sys, time
c = json.load(open(sys.argv[1])); o = c["claudeAiOauth"]
assert o["subscriptionType"] == "max", o
assert o["scopes"] == ["user:inference", "user:profile", "user:sessions:claude_code",
                       "user:mcp_servers", "user:file_upload"], o
assert 3000 < o["expiresAt"] / 1000 - time.time() <= 3600, o
assert c["otherTopLevel"] == {"keep": "me"}, c
PY
m1=$(log_mark)
run_claude
logq "$m1" "
msgs = messages()
assert msgs and all(e['authorization'] == 'Bearer $OLD_ACCESS' for e in msgs), [e['authorization'] for e in msgs]
assert not token_posts(), token_posts()" || fail "(e) claude did not use the mirrored token without refreshing (see $LOG)"
pass "(e) claude -p hi in the follower's folder used the mirrored token and made no refresh request"

host_llmctl refresh claude > /dev/null || fail "(e) host refresh failed"
NEW_E=$(cred "$HOST_CRED" "c['claudeAiOauth']['accessToken']")
mirror_has "$NEW_E" || fail "(e) the mirror did not follow the host's rotation: $(cat "$CRED")"
m2=$(log_mark)
run_claude
logq "$m2" "
msgs = messages()
assert msgs and all(e['authorization'] == 'Bearer $NEW_E' for e in msgs), [e['authorization'] for e in msgs]
assert not token_posts(), token_posts()" || fail "(e) claude did not use the rotated mirror token (see $LOG)"
pass "(e) after a host rotation the mirror holds the new token and claude -p hi used it without refreshing"

# The follower is gone and the mirrored token nears expiry: Claude Code refreshes from the
# mirror. The token endpoint refuses the marker; the host's login is untouched.
stop_llmd
echo "{\"reject_refresh_tokens\": [\"$MARKER\"]}" > "$CONTROL"
python3 - "$CRED" <<'PY'
import json, sys, time
c = json.load(open(sys.argv[1])); c["claudeAiOauth"]["expiresAt"] = int(time.time() * 1000) + 60000
json.dump(c, open(sys.argv[1], "w"))
PY
m3=$(log_mark)
(cd "$H" && env "${SENV[@]}" \
    HTTPS_PROXY="http://127.0.0.1:$PORT" HTTP_PROXY="http://127.0.0.1:$PORT" NO_PROXY= \
    NODE_EXTRA_CA_CERTS="$W/ca/ca.pem" \
    CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1 DISABLE_TELEMETRY=1 \
    DISABLE_AUTOUPDATER=1 DISABLE_ERROR_REPORTING=1 \
    timeout "$CLI_TIMEOUT" "$CLAUDE_BIN" -p hi) > "$S/claude-forced.out" 2>&1 || true
logq "$m3" "
p = token_posts()
assert p and all(e['body']['refresh_token'] == '$MARKER' for e in p), [e['body'].get('refresh_token') for e in p]
print(len(p))" > "$S/forced" || fail "(e) claude did not try to refresh from the mirror (see $LOG)"
echo '{}' > "$CONTROL"
[ "$(cred "$HOST_CRED" "c['claudeAiOauth']['accessToken']")" = "$NEW_E" ] \
    || fail "(e) the host's login changed"
host_llmctl refresh claude > /dev/null || fail "(e) the host could not refresh after the mirror's attempt"
NEW_E2=$(cred "$HOST_CRED" "c['claudeAiOauth']['accessToken']")
start_llmd
mirror_has "$NEW_E2" || fail "(e) the restarted follower did not repair the mirror: $(cat "$CRED")"
pass "(e) a refresh from the mirror sent only the marker ($(cat "$S/forced") request(s), refused); the host still refreshes and the follower repairs the mirror"
stop_llmd

echo "all checks passed (Claude Code $cli_version)"

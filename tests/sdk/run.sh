#!/usr/bin/env bash
# The official `anthropic` and `openai` Python SDKs, unmodified, through the llmd HTTP
# gateway in front of the fake providers on 127.0.0.1 (tests/src/bin/llmd-fake-providers).
# Needs python3 with the venv module and PyPI; CI (.ci/run) runs it after the Rust tests.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
target=${CARGO_TARGET_DIR:-$root/target}
bin=${LLMD_BIN_DIR:-$target/debug}
if [ ! -x "$bin/llmd" ] || [ ! -x "$bin/llmctl" ] || [ ! -x "$bin/llmd-fake-providers" ]; then
    cargo build --workspace --bins
fi
venv=${LLMD_SDK_VENV:-$target/sdk-venv}
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
"$venv/bin/pip" install -q --disable-pip-version-check -r tests/sdk/requirements.txt

work=$(mktemp -d)
chmod 700 "$work"
llmd_pid=""
fake_pid=""
cleanup() {
    [ -n "$llmd_pid" ] && kill "$llmd_pid" 2>/dev/null || true
    exec 3>&- 2>/dev/null || true
    [ -n "$fake_pid" ] && kill "$fake_pid" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

# wait_for FILE PATTERN: until FILE contains PATTERN, 20 s at most.
wait_for() {
    for _ in $(seq 200); do
        grep -q "$2" "$1" 2>/dev/null && return 0
        sleep 0.1
    done
    echo "timed out waiting for $2 in $1:" >&2
    cat "$1" >&2 || true
    return 1
}

# The fake serves until its stdin (this script's fd 3) closes.
mkfifo "$work/fake.in"
"$bin/llmd-fake-providers" <"$work/fake.in" >"$work/fake.out" 2>&1 &
fake_pid=$!
exec 3>"$work/fake.in"
wait_for "$work/fake.out" ADMIN_URL
fake_url=$(sed -n 's/^FAKE_URL=//p' "$work/fake.out")
admin_url=$(sed -n 's/^ADMIN_URL=//p' "$work/fake.out")

export HOME=$work XDG_RUNTIME_DIR=$work/run XDG_CONFIG_HOME=$work/config XDG_STATE_HOME=$work/state
mkdir -p "$XDG_RUNTIME_DIR" "$XDG_CONFIG_HOME/llmd"
chmod 700 "$XDG_RUNTIME_DIR"
export SDK_PROFILE_KEY="sk-profile-$RANDOM$RANDOM$RANDOM"
cat >"$XDG_CONFIG_HOME/llmd/config.toml" <<TOML
[gateway]
listen = "127.0.0.1:0"

[profiles.an]
provider = "anthropic"
auth = "api-key"
api_key_env = "SDK_PROFILE_KEY"
base_url = "$fake_url"

[profiles.oa]
provider = "openai-compat"
auth = "api-key"
api_key_env = "SDK_PROFILE_KEY"
base_url = "$fake_url/v1"

[profiles.gm]
provider = "gemini"
auth = "api-key"
api_key_env = "SDK_PROFILE_KEY"
base_url = "$fake_url/v1beta"
TOML
"$bin/llmd" >"$work/llmd.log" 2>&1 &
llmd_pid=$!
for _ in $(seq 200); do
    "$bin/llmctl" status >/dev/null 2>&1 && break
    sleep 0.1
done
status=$("$bin/llmctl" status --json)
LLMD_GATEWAY=$(printf '%s' "$status" | "$venv/bin/python" -c 'import json,sys; print(json.load(sys.stdin)["gateway"]["listen"])')
LLMD_GATEWAY_KEY=$("$bin/llmctl" gateway key)
export LLMD_GATEWAY LLMD_GATEWAY_KEY FAKE_ADMIN=$admin_url

rc=0
"$venv/bin/python" -m pytest -q -p no:cacheprovider tests/sdk/test_sdks.py "$@" || rc=$?
if [ "$rc" -eq 5 ]; then
    echo "tests/sdk: pytest collected no tests" >&2
    exit 1
fi
if grep -qF "$LLMD_GATEWAY_KEY" "$work/llmd.log"; then
    echo "tests/sdk: the gateway key appeared in llmd's log" >&2
    exit 1
fi
exit "$rc"

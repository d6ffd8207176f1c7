#!/usr/bin/env bash
# Validate the Kubernetes manifests in deploy/kubernetes:
#   1. yamllint --strict with deploy/.yamllint.yaml (every *.yaml under deploy/);
#   2. kubernetes-validate --strict against the oldest Kubernetes the manifests
#      need (1.30: the preStop `sleep` action) and a recent one, for every
#      manifest (examples and the Secret example included);
#   3. kustomization.yaml: its resources exist, and `kubectl kustomize` output
#      validates too (when kubectl is installed);
#   4. the ConfigMap's config.toml really loads: against a throwaway PostgreSQL
#      (`db-lifecycle dev`), `db-lifecycle migrate --config <it>` applies the
#      migrations to a fresh metadata database and `serve --config <it>` starts,
#      with the same non-secret environment variables as the Deployment. Skipped
#      with a message when no db-lifecycle binary is built.
#
#   deploy/validate.sh
#
# Environment:
#   K8S_VERSIONS        Kubernetes versions to validate against (default "1.30.0 1.35.0")
#   DB_LIFECYCLE_BIN    the db-lifecycle binary (default: target/debug, else target/release)
#
# yamllint and kubernetes-validate are used from PATH when python3 can import
# them; otherwise they are installed (pinned) into target/tools/py-k8s.
# Exit status: 0 when every check passed (a skipped config check counts as
# passed), 1 otherwise. Everything started here is stopped on exit.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1

K8S_DIR="deploy/kubernetes"
K8S_VERSIONS="${K8S_VERSIONS:-1.30.0 1.35.0}"
VENV="$ROOT/target/tools/py-k8s"
PINS=("yamllint==1.38.0" "kubernetes-validate==1.37.0")

FAILED=()
say() { printf '%s\n' "$*"; }
fail() {
  say "FAIL: $*"
  FAILED+=("$1")
}

WORK="$(mktemp -d "${TMPDIR:-/tmp}/db-lifecycle-validate.XXXXXX")"
DEV_PID=""
SERVE_PID=""
stop_pid() {
  local pid=$1
  [ -n "$pid" ] || return 0
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 1 150); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.2
    done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
  fi
  wait "$pid" 2>/dev/null
}
cleanup() {
  stop_pid "$SERVE_PID"
  SERVE_PID=""
  stop_pid "$DEV_PID"
  DEV_PID=""
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------- tools ----------
PY=python3
if ! python3 -c 'import yaml, yamllint, kubernetes_validate' 2>/dev/null; then
  if ! "$VENV/bin/python" -c 'import yaml, yamllint, kubernetes_validate' 2>/dev/null; then
    say "installing ${PINS[*]} into $VENV"
    python3 -m venv "$VENV" >/dev/null &&
      "$VENV/bin/pip" install --quiet "${PINS[@]}" ||
      { say "FAIL: cannot install ${PINS[*]} (pip install them, or make target/tools/py-k8s)"; exit 1; }
  fi
  PY="$VENV/bin/python"
fi
yamllint_() { "$PY" -m yamllint "$@"; }
kvalidate() { "$PY" -m kubernetes_validate "$@"; }
say "using $("$PY" -m yamllint --version), kubernetes-validate $("$PY" -m kubernetes_validate --version 2>&1 | tail -n 1)"

# ---------- 1. yamllint ----------
say "== yamllint --strict -c deploy/.yamllint.yaml"
if yamllint_ --strict -c deploy/.yamllint.yaml "$K8S_DIR" deploy/.yamllint.yaml; then
  say "ok"
else
  fail "yamllint"
fi

# ---------- 2. kubernetes-validate ----------
mapfile -t MANIFESTS < <(find "$K8S_DIR" -name '*.yaml' ! -name kustomization.yaml | sort)
if [ "${#MANIFESTS[@]}" -eq 0 ]; then
  fail "no manifests found in $K8S_DIR"
fi
for v in $K8S_VERSIONS; do
  say "== kubernetes-validate --strict -k $v (${#MANIFESTS[@]} files)"
  if kvalidate --strict --quiet -k "$v" "${MANIFESTS[@]}"; then
    say "ok"
  else
    fail "kubernetes-validate $v"
  fi
done

# ---------- 3. kustomization ----------
say "== kustomization.yaml"
if "$PY" - "$K8S_DIR" <<'EOF'; then
import os, sys, yaml
d = sys.argv[1]
k = yaml.safe_load(open(os.path.join(d, "kustomization.yaml")))
missing = [r for r in k.get("resources", []) if not os.path.exists(os.path.join(d, r))]
listed = set(k.get("resources", []))
# Deliberately not applied by `kubectl apply -k`.
excluded = {"secret.example.yaml"}
unlisted = sorted(
    f for f in os.listdir(d)
    if f.endswith(".yaml") and f != "kustomization.yaml" and f not in listed | excluded
)
for r in missing:
    print(f"kustomization.yaml lists a missing file: {r}")
for f in unlisted:
    print(f"{f} is neither in kustomization.yaml resources nor a known exclusion")
sys.exit(1 if missing or unlisted else 0)
EOF
  say "ok (resources exist)"
else
  fail "kustomization resources"
fi
if command -v kubectl >/dev/null 2>&1; then
  if kubectl kustomize "$K8S_DIR" >"$WORK/kustomized.yaml" 2>"$WORK/kustomize.err"; then
    last=${K8S_VERSIONS##* }
    if kvalidate --strict --quiet -k "$last" "$WORK/kustomized.yaml"; then
      say "ok (kubectl kustomize output validates against $last)"
    else
      fail "kustomize output"
    fi
  else
    cat "$WORK/kustomize.err"
    fail "kubectl kustomize"
  fi
else
  say "kubectl not installed: kustomize build not checked"
fi

# ---------- 4. the ConfigMap's config.toml loads ----------
say "== config.toml from the ConfigMap: migrate and serve against a throwaway PostgreSQL"
BIN="${DB_LIFECYCLE_BIN:-}"
if [ -z "$BIN" ]; then
  for cand in target/debug/db-lifecycle target/release/db-lifecycle; do
    if [ -x "$cand" ]; then
      BIN="$cand"
      break
    fi
  done
fi
config_check() {
  # Extract config.toml and the Deployment's literal env values (the secret ones
  # come from the throwaway cluster instead).
  "$PY" - "$K8S_DIR" "$WORK" <<'EOF' || return 1
import os, shlex, sys, yaml
d, work = sys.argv[1], sys.argv[2]
cm = yaml.safe_load(open(os.path.join(d, "db-lifecycle-config.yaml")))
open(os.path.join(work, "config.toml"), "w").write(cm["data"]["config.toml"])
dep = yaml.safe_load(open(os.path.join(d, "db-lifecycle-deployment.yaml")))
c = dep["spec"]["template"]["spec"]["containers"][0]
assert c["command"][-2:] == ["--config", "/etc/db-lifecycle/config.toml"], c["command"]
with open(os.path.join(work, "env.sh"), "w") as f:
    for e in c.get("env", []):
        if "value" in e:
            f.write(f"export {e['name']}={shlex.quote(e['value'])}\n")
EOF
  # shellcheck disable=SC1091
  . "$WORK/env.sh"

  "$BIN" dev --listen 127.0.0.1:0 --state-file "$WORK/state.json" </dev/null >"$WORK/dev.log" 2>&1 &
  DEV_PID=$!
  for _ in $(seq 1 300); do
    [ -s "$WORK/state.json" ] && break
    kill -0 "$DEV_PID" 2>/dev/null || break
    sleep 0.2
  done
  if [ ! -s "$WORK/state.json" ]; then
    say "db-lifecycle dev did not start:"
    tail -n 20 "$WORK/dev.log"
    return 1
  fi
  local admin_url meta_url fresh_url
  admin_url=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["admin_url"])' "$WORK/state.json")
  meta_url=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["metadata_url"])' "$WORK/state.json")

  # A fresh metadata database, so that `migrate` really applies migrations.
  # (dev's own metadata database is already migrated by dev itself.)
  local psql=""
  if command -v psql >/dev/null 2>&1; then
    psql=psql
  else
    psql=$(ls /usr/lib/postgresql/*/bin/psql 2>/dev/null | tail -n 1)
  fi
  if [ -n "$psql" ] && "$psql" -X -q "$admin_url" -c 'CREATE DATABASE k8s_config_check' >/dev/null; then
    fresh_url="${admin_url%/*}/k8s_config_check"
  else
    say "(no psql: migrating dev's own, already migrated, metadata database)"
    fresh_url="$meta_url"
  fi

  export DB_LIFECYCLE_METADATA_URL="$fresh_url" DB_LIFECYCLE_ADMIN_URL="$admin_url"
  if ! "$BIN" migrate --config "$WORK/config.toml" >"$WORK/migrate.out" 2>"$WORK/migrate.err"; then
    say "migrate failed:"
    cat "$WORK/migrate.err"
    return 1
  fi
  cat "$WORK/migrate.out"
  if [ "$fresh_url" != "$meta_url" ] && ! grep -q '^migrations applied: V' "$WORK/migrate.out"; then
    say "migrate applied nothing to a fresh database"
    return 1
  fi

  # serve with the same file (listen overridden to a free loopback port).
  DB_LIFECYCLE_LISTEN=127.0.0.1:0 "$BIN" serve --config "$WORK/config.toml" \
    </dev/null >"$WORK/serve.out" 2>"$WORK/serve.err" &
  SERVE_PID=$!
  for _ in $(seq 1 150); do
    grep -q '^db-lifecycle listening on ' "$WORK/serve.out" && break
    kill -0 "$SERVE_PID" 2>/dev/null || break
    sleep 0.2
  done
  if ! grep -q '^db-lifecycle listening on ' "$WORK/serve.out"; then
    say "serve did not start:"
    cat "$WORK/serve.err"
    return 1
  fi
  grep '^db-lifecycle listening on ' "$WORK/serve.out"
  kill -TERM "$SERVE_PID"
  local rc=0
  wait "$SERVE_PID" || rc=$?
  SERVE_PID=""
  if [ "$rc" -ne 0 ]; then
    say "serve exited with $rc after SIGTERM:"
    cat "$WORK/serve.err"
    return 1
  fi
  say "serve started and stopped cleanly"
  return 0
}
if [ -n "${DB_LIFECYCLE_BIN:-}" ] && [ ! -x "$BIN" ]; then
  fail "DB_LIFECYCLE_BIN=$BIN is not an executable"
elif [ -z "$BIN" ]; then
  say "SKIP: no db-lifecycle binary (run \`cargo build --bins\` first); config.toml not load-checked"
elif config_check; then
  say "ok"
else
  fail "config.toml load check"
fi
stop_pid "$SERVE_PID"
SERVE_PID=""
stop_pid "$DEV_PID"
DEV_PID=""

# ---------- summary ----------
if [ "${#FAILED[@]}" -eq 0 ]; then
  say "deploy/validate.sh: all checks passed"
  exit 0
fi
say "deploy/validate.sh: FAILED: ${FAILED[*]}"
exit 1

#!/usr/bin/env bash
# Starts a local cluster of N nodes (default 3) on 127.0.0.1 with mutual TLS, in ./patina-cluster.
# Node i serves its API on 127.0.0.1:808i and gossips on 127.0.0.1:878i. Ctrl-C stops them all.
set -euo pipefail
n=${1:-3}
root=${PATINA_CLUSTER_DIR:-patina-cluster}
cargo build -q -p patina
bin=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')/debug/patina
mkdir -p "$root/tls" "$root/schema"
[ -f "$root/tls/ca.key" ] || "$bin" tls ca generate --out "$root/tls" >/dev/null
[ -f "$root/tls/server.key" ] || "$bin" tls server generate 127.0.0.1 --ca-key "$root/tls/ca.key" --out "$root/tls" >/dev/null
[ -n "$(ls "$root/schema")" ] || cat > "$root/schema/example.sql" <<'SQL'
CREATE TABLE hosts (id INTEGER PRIMARY KEY, name TEXT NOT NULL DEFAULT '', zone TEXT);
SQL
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait' INT TERM EXIT
for i in $(seq 1 "$n"); do
  dir="$root/node$i"
  mkdir -p "$dir"
  cat > "$dir/config.toml" <<TOML
[db]
path = "$dir/state.db"
schema_paths = ["$root/schema"]
[api]
addr = "127.0.0.1:$((8080 + i))"
[admin]
path = "$dir/admin.sock"
[gossip]
addr = "127.0.0.1:$((8780 + i))"
bootstrap = ["127.0.0.1:8781"]
[gossip.tls]
cert_file = "$root/tls/server.pem"
key_file = "$root/tls/server.key"
ca_file = "$root/tls/ca.pem"
TOML
  "$bin" agent -c "$dir/config.toml" > "$dir/agent.log" 2>&1 &
  pids+=($!)
  echo "node$i: API http://127.0.0.1:$((8080 + i))  (log: $dir/agent.log)"
done
echo "cluster running; try: $bin exec --api 127.0.0.1:8081 \"INSERT INTO hosts (id, name) VALUES (1, 'web-1')\""
echo "                      $bin query --api 127.0.0.1:8083 \"SELECT * FROM hosts\""
wait

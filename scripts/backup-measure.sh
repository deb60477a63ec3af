#!/usr/bin/env bash
# Times `patina backup` of a node holding ROWS rows (default 1,000,000) while a client keeps
# writing to it, and restores the backup under a new site id. Build first:
#   cargo build --release -p patina && scripts/backup-measure.sh [ROWS]
set -euo pipefail
rows=${1:-1000000}
root=$(cd "$(dirname "$0")/.." && pwd)
bin=${PATINA_BIN:-$root/target/release/patina}
work=$(mktemp -d /tmp/patina-backup.XXXXXX)
agent=
writer=
trap '[ -n "$writer" ] && kill $writer 2>/dev/null; [ -n "$agent" ] && kill $agent 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT
mkdir -p "$work/schema"
echo "CREATE TABLE kv (k TEXT NOT NULL PRIMARY KEY, v TEXT);" > "$work/schema/kv.sql"
batch=100000
start=$(date +%s.%N)
for ((off = 0; off < rows; off += batch)); do
  n=$(( rows - off < batch ? rows - off : batch ))
  "$bin" db exec --db "$work/state.db" --schema "$work/schema" \
    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < $n)
     INSERT INTO kv (k, v) SELECT 'k' || (x + $off), 'value of row ' || (x + $off) FROM c" >/dev/null
done
echo "loaded $rows rows in $(echo "$(date +%s.%N) - $start" | bc) s; database $(du -h "$work/state.db" | cut -f1)"
cat > "$work/config.toml" <<TOML
[db]
path = "$work/state.db"
schema_paths = ["$work/schema"]
[api]
addr = "127.0.0.1:0"
[admin]
path = "$work/admin.sock"
[gossip]
addr = "127.0.0.1:0"
TOML
"$bin" agent -c "$work/config.toml" > "$work/agent.out" 2> "$work/agent.log" &
agent=$!
until grep -q "API on" "$work/agent.out" 2>/dev/null; do sleep 0.1; done
api=$(sed -n 's|.*API on http://\([^,]*\),.*|\1|p' "$work/agent.out")
# A client writing one row per request for as long as the backup runs.
( i=0; while :; do "$bin" exec --api "$api" "INSERT INTO kv (k, v) VALUES ('w$i', 'during')" >/dev/null && echo $i > "$work/written"; i=$((i+1)); done ) &
writer=$!
sleep 1
before=$(cat "$work/written")
start=$(date +%s.%N)
"$bin" backup --admin "$work/admin.sock" "$work/backup.db"
took=$(echo "$(date +%s.%N) - $start" | bc)
after=$(cat "$work/written")
echo "backup: $took s wall, $(du -h "$work/backup.db" | cut -f1); $((after - before)) writes acknowledged meanwhile"
kill $writer; wait $writer 2>/dev/null || true; writer=
kill $agent; wait $agent 2>/dev/null || true; agent=
start=$(date +%s.%N)
"$bin" restore "$work/backup.db" --db "$work/restored.db" -c "$work/config.toml"
echo "restore (new site id, every row clock rewritten): $(echo "$(date +%s.%N) - $start" | bc) s"

#!/usr/bin/env bash
# Memory of one agent under a 7-way self cross join subscription of a 12-row table (issue 17):
# starts BIN (a `patina` binary) on 127.0.0.1:18180, inserts 12 rows, subscribes, prints the
# answer and the resident memory at 3, 6 and 12 s, then whether another subscription answers.
# usage: scripts/crossjoin-memory.sh target/release/patina
BIN=$1; D=$(mktemp -d); mkdir -p $D/schema
echo "CREATE TABLE tests (id INTEGER NOT NULL PRIMARY KEY, v TEXT);" > $D/schema/s.sql
cat > $D/c.toml <<EOC
[db]
path = "$D/state.db"
schema_paths = ["$D/schema"]
[api]
addr = "127.0.0.1:18180"
[admin]
path = "$D/admin.sock"
[gossip]
addr = "127.0.0.1:18181"
EOC
$BIN agent -c $D/c.toml > $D/out 2> $D/log & PID=$!
sleep 1
for i in $(seq 1 12); do curl -s -X POST localhost:18180/v1/transactions -d "[\"INSERT INTO tests (id, v) VALUES ($i, 'x')\"]" > /dev/null; done
rss() { awk '/VmRSS/ {printf "%.0f MB", $2/1024}' /proc/$PID/status; }
echo "before: $(rss)"
curl -s -m 3 -X POST localhost:18180/v1/subscriptions -d '"SELECT a.id FROM tests a, tests b, tests c, tests d, tests e, tests f, tests g"' -o $D/sub.out -w "subscribe: %{http_code} after %{time_total} s\n"
head -c 200 $D/sub.out; echo
for t in 3 6 12; do sleep 3; echo "t+${t}s: $(rss)"; [ $t = 6 ] && sleep 3; done
curl -s -m 2 -X POST localhost:18180/v1/subscriptions -d '"SELECT id FROM tests"' -o /dev/null -w "another subscription: %{http_code} in %{time_total} s\n"
kill -9 $PID; rm -rf $D

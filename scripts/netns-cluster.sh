#!/usr/bin/env bash
# A cluster of N hosts on this machine, each a network namespace with its own address
# (10.77.0.1..N on one bridge), a `patina agent` on each binding 0.0.0.0 with mutual TLS and
# joining through the name "seed" (host 1, in each host's /etc/hosts). This machine reaches
# the hosts' APIs (10.77.0.i:8080) through a veth of its own (10.77.0.254). Then it runs
# `loadgen remote` against them with the arguments after `--`, and removes everything on exit
# (also on Ctrl-C). Needs root and iproute2; build first:
#
#   cargo build --release -p patina -p loadgen
#   sudo scripts/netns-cluster.sh 5 -- --writes 200 --rate 10 --json netns-5.json
set -euo pipefail
n=${1:-5}
shift || true
[ "${1:-}" = "--" ] && shift
root=$(cd "$(dirname "$0")/.." && pwd)
bin=${PATINA_BIN:-$root/target/release/patina}
loadgen=${LOADGEN_BIN:-$root/target/release/loadgen}
[ -x "$bin" ] && [ -x "$loadgen" ] || { echo "build first: cargo build --release -p patina -p loadgen" >&2; exit 2; }
prefix=pn$$
hub=$prefix-hub
work=$(mktemp -d /tmp/patina-netns.XXXXXX)
pids=()

cleanup() {
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  for i in $(seq 1 "$n"); do
    ip netns del "$prefix-h$i" 2>/dev/null || true
    rm -rf "/etc/netns/$prefix-h$i"
  done
  ip link del "$prefix-r" 2>/dev/null || true
  ip netns del "$hub" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

ip netns add "$hub"
ip -n "$hub" link add br0 type bridge
ip -n "$hub" link set br0 up
# This machine's own leg on the bridge.
ip link add "$prefix-r" type veth peer name vroot netns "$hub"
ip -n "$hub" link set vroot master br0 up
ip addr add 10.77.0.254/24 dev "$prefix-r"
ip link set "$prefix-r" up

"$bin" tls ca generate --out "$work/tls" >/dev/null
"$bin" tls server generate patina --ca-key "$work/tls/ca.key" --out "$work/tls" >/dev/null
apis=()
for i in $(seq 1 "$n"); do
  ns=$prefix-h$i
  ip netns add "$ns"
  ip -n "$hub" link add "v$i" type veth peer name eth0 netns "$ns"
  ip -n "$hub" link set "v$i" master br0 up
  ip -n "$ns" link set lo up
  ip -n "$ns" addr add "10.77.0.$i/24" dev eth0
  ip -n "$ns" link set eth0 up
  mkdir -p "/etc/netns/$ns"
  printf '127.0.0.1 localhost\n10.77.0.1 seed\n' > "/etc/netns/$ns/hosts"
  dir=$work/host$i
  mkdir -p "$dir/schema"
  cat > "$dir/schema/loadgen.sql" <<'SQL'
CREATE TABLE loadgen (id TEXT NOT NULL PRIMARY KEY, at INTEGER NOT NULL DEFAULT 0);
SQL
  cat > "$dir/config.toml" <<TOML
[db]
path = "$dir/state.db"
schema_paths = ["$dir/schema"]
[api]
addr = "0.0.0.0:8080"
[admin]
path = "$dir/admin.sock"
[gossip]
addr = "0.0.0.0:8787"
bootstrap = ["seed:8787"]
[gossip.tls]
cert_file = "$work/tls/server.pem"
key_file = "$work/tls/server.key"
ca_file = "$work/tls/ca.pem"
server_name = "patina"
TOML
  ip netns exec "$ns" "$bin" agent -c "$dir/config.toml" > "$dir/agent.log" 2>&1 &
  pids+=($!)
  apis+=("10.77.0.$i:8080")
done
list=$(IFS=,; echo "${apis[*]}")
"$loadgen" remote --apis "$list" --latency "veth on one machine (no delay added)" "$@"

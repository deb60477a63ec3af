#!/usr/bin/env python3
"""Hostile requests against one release `patina agent`, the way a client sends them.

Usage: scripts/hostile-requests.py PATH/TO/patina [ROWS]

Starts the agent with its built-in defaults in a temporary folder (API on 127.0.0.1:8080, so
nothing else may listen there), gives it a `hosts` table, then for each case prints the answer's
status, how long it took, and the agent's peak resident memory so far (VmHWM):

- a request head announcing a 100-byte body, then 7 bytes and nothing more;
- a query that never ends, asking for `?timeout=600` (the node's own limit is 10 s);
- `SELECT zeroblob(300000000)`: a 300 MB value made in one step of SQLite's program;
- a write of a 5 MB text value (peers decode at most 4 MiB);
- a query of one row of 8 values of 60 MB each (each under the 64 MiB value cap), then of 20:
  its answer, how long it took, the agent's peak memory;
- a statement inserting 3,000,000 rows of 1,000 bytes (3 GB, far over the 64 MiB a
  transaction may commit): its answer, the agent's peak memory and the write-ahead log's size;
- `GET /v1/sync/digest?timeout=1` on ROWS rows (default 1,000,000), with a one-row write sent
  0.2 s after it: how long that write waited for the store;
- 50 clients that ask for a 50 MB query answer and never read it: the agent's open files,
  resident memory and bytes unsent in its sockets 5, 70, 130 and 190 s later (the agent's 4
  readers take them four at a time, each for up to the 10 s deadline; `api.idle_timeout_ms`
  is 60 s).
"""

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

API = "http://127.0.0.1:8080"


def call(method, path, body=None, timeout=60.0):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(API + path, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    started = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            text = answer.read()
            return answer.status, time.monotonic() - started, text
    except urllib.error.HTTPError as e:
        return e.code, time.monotonic() - started, e.read()
    except (TimeoutError, socket.timeout):
        return None, time.monotonic() - started, b"no answer"


def peak_mib(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def report(name, status, took, pid, text=b""):
    shown = text[:100].decode(errors="replace").replace("\n", " ")
    print(f"{name}: {status} after {took:.3f} s, peak RSS {peak_mib(pid):.0f} MiB  {shown}")


def stalled_body():
    sock = socket.create_connection(("127.0.0.1", 8080))
    sock.sendall(
        b"POST /v1/transactions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100\r\n\r\n[\"INSERT"
    )
    sock.settimeout(30.0)
    started = time.monotonic()
    try:
        answer = sock.recv(4096)
        status = answer.split(b" ")[1].decode() if answer else "closed"
    except socket.timeout:
        answer, status = b"", None
    took = time.monotonic() - started
    sock.close()
    return status, took, answer.split(b"\r\n\r\n")[-1]


def open_files(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def resident_mib(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def api_sockets():
    """The agent's open API connections, and the bytes they hold unsent (kernel memory,
    outside its RSS)."""
    lines = subprocess.run(
        ["ss", "-tnH", "state", "established", "( sport = :8080 )"],
        capture_output=True,
        text=True,
    ).stdout.splitlines()
    lines = [line.split() for line in lines if line.split()]
    return len(lines), sum(int(line[1]) for line in lines) / (1024 * 1024)


def never_reading(pid, clients=50):
    query = json.dumps(
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c LIMIT 250000) "
        "SELECT x, printf('%.180c', 'a') FROM c"
    ).encode()
    before = open_files(pid)
    sockets = []
    for _ in range(clients):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", 8080))
        sock.sendall(
            b"POST /v1/queries HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(query)}\r\n\r\n".encode()
            + query
        )
        sockets.append(sock)
    started = time.monotonic()
    for at in (5.0, 70.0, 130.0, 190.0):
        time.sleep(max(0.0, at - (time.monotonic() - started)))
        connections, unsent = api_sockets()
        print(
            f"{clients} clients not reading a 50 MB answer, after {at:.0f} s: "
            f"{connections} connections open, {open_files(pid) - before} more open files, "
            f"RSS {resident_mib(pid):.0f} MiB, {unsent:.1f} MiB unsent in its sockets"
        )
    for sock in sockets:
        sock.close()


def main():
    binary = os.path.abspath(sys.argv[1])
    rows = int(sys.argv[2]) if len(sys.argv) > 2 else 1_000_000
    folder = tempfile.mkdtemp(prefix="patina-hostile-")
    os.makedirs(os.path.join(folder, "patina-data", "schema"))
    with open(os.path.join(folder, "patina-data", "schema", "hosts.sql"), "w") as schema:
        schema.write("CREATE TABLE hosts (id INTEGER PRIMARY KEY, name TEXT NOT NULL DEFAULT '');\n")
    agent = subprocess.Popen(
        [binary, "agent"], cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        for _ in range(100):
            try:
                if call("GET", "/v1/health", timeout=1.0)[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        status, took, text = stalled_body()
        report("stalled request body", status, took, agent.pid, text)
        status, took, text = call(
            "POST",
            "/v1/queries?timeout=600",
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c) SELECT count(*) FROM c",
            timeout=30.0,
        )
        report("runaway query asking for ?timeout=600", status, took, agent.pid, text)
        status, took, text = call("POST", "/v1/queries", "SELECT zeroblob(300000000)")
        report("SELECT zeroblob(300000000)", status, took, agent.pid, text)
        status, took, text = call(
            "POST",
            "/v1/transactions",
            ["INSERT INTO hosts (id, name) VALUES (-1, printf('%.*c', 5000000, 'x'))"],
        )
        report("write of a 5 MB value", status, took, agent.pid, text)
        for columns in (8, 20):
            status, took, text = call(
                "POST",
                "/v1/queries",
                "SELECT " + ", ".join(["randomblob(60000000)"] * columns),
                timeout=120.0,
            )
            size = f"{len(text) / 1e6:.0f} MB answer" if status == 200 else ""
            report(f"one row of {columns} values of 60 MB", status, took, agent.pid, text[-120:])
            if size:
                print(f"  {size}")
        status, took, text = call(
            "POST",
            "/v1/transactions",
            [
                "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c LIMIT 3000000) "
                "INSERT INTO hosts (id, name) SELECT x, printf('%.1000c', 'a') FROM c"
            ],
        )
        report("insert of 3,000,000 rows of 1,000 bytes", status, took, agent.pid, text)
        wal = os.path.join(folder, "patina-data", "state.db-wal")
        print(f"  write-ahead log after it: {os.path.getsize(wal) / (1024 * 1024):.0f} MiB")
        never_reading(agent.pid)
        step = 200_000
        for first in range(0, rows, step):
            status, _, text = call(
                "POST",
                "/v1/transactions",
                [
                    f"WITH RECURSIVE c(x) AS (SELECT {first + 1} UNION ALL SELECT x+1 FROM c "
                    f"LIMIT {min(step, rows - first)}) INSERT INTO hosts (id, name) "
                    "SELECT x, 'host-' || x FROM c"
                ],
            )
            assert status == 200, text
        waited = {}

        def write_during():
            time.sleep(0.2)
            waited["write"] = call(
                "POST", "/v1/transactions", ["INSERT INTO hosts (id) VALUES (0)"]
            )

        writer = threading.Thread(target=write_during)
        writer.start()
        status, took, text = call("GET", "/v1/sync/digest?timeout=1")
        writer.join()
        report(f"digest of {rows} rows, ?timeout=1", status, took, agent.pid, text)
        w_status, w_took, _ = waited["write"]
        print(f"  a write sent 0.2 s into it: {w_status} after {w_took:.3f} s")
    finally:
        agent.terminate()
        agent.wait(timeout=30)


if __name__ == "__main__":
    main()

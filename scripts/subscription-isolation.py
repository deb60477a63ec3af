#!/usr/bin/env python3
# A costly subscription must not hold up the others: one release agent, a subscription on kv,
# then five times a costly subscription (a 7-way join that runs until subscriptions.pass_timeout_ms)
# and, 0.3 s into it, a write to kv; prints how long the write took to reach the first
# subscription. Usage: scripts/subscription-isolation.py [path to patina] (release build).
import http.client, json, subprocess, sys, time, threading, os, tempfile, socket, shutil
patina = sys.argv[1] if len(sys.argv) > 1 else "target/release/patina"
d = tempfile.mkdtemp()
os.makedirs(f"{d}/schema")
open(f"{d}/schema/s.sql","w").write("CREATE TABLE kv (k TEXT NOT NULL PRIMARY KEY, v TEXT);\n")
def port():
    s=socket.socket(); s.bind(("127.0.0.1",0)); p=s.getsockname()[1]; s.close(); return p
api, gossip = port(), port()
open(f"{d}/c.toml","w").write(f"""[db]
path = "{d}/state.db"
schema_paths = ["{d}/schema"]
[api]
addr = "127.0.0.1:{api}"
[admin]
path = "{d}/admin.sock"
[gossip]
addr = "127.0.0.1:{gossip}"
plaintext = true
""")
agent = subprocess.Popen([patina, "agent", "-c", f"{d}/c.toml"], stderr=subprocess.DEVNULL)
for _ in range(100):
    try:
        c=http.client.HTTPConnection("127.0.0.1",api); c.request("GET","/v1/health"); c.getresponse().read(); break
    except Exception: time.sleep(0.1)
def post(path, body):
    c=http.client.HTTPConnection("127.0.0.1",api); c.request("POST",path,json.dumps(body),{"Content-Type":"application/json"}); r=c.getresponse(); return r.status, r.read()
post("/v1/transactions", [f"INSERT INTO kv (k, v) VALUES ('{i}', 'x')" for i in range(12)])
fast = http.client.HTTPConnection("127.0.0.1",api)
fast.request("POST","/v1/subscriptions",json.dumps("SELECT k FROM kv"),{"Content-Type":"application/json"})
resp = fast.getresponse()
for _ in range(14): resp.fp.readline()
for trial in range(5):
    done = {}
    def costly():
        t=time.time()
        st,_ = post("/v1/subscriptions", f"SELECT a.k FROM kv a, kv b, kv c, kv d, kv e, kv f, kv g WHERE a.v||b.v||c.v||d.v||e.v||f.v||g.v = 'never{trial}'")
        done['t']=time.time()-t; done['status']=st
    th=threading.Thread(target=costly); th.start()
    time.sleep(0.3)
    t0=time.time()
    post("/v1/transactions", [f"INSERT INTO kv (k, v) VALUES ('n{trial}', 'x')"])
    line = resp.fp.readline()
    dt=time.time()-t0
    th.join()
    print(f"event {dt*1000:.1f} ms after the write; the costly subscription answered {done['status']} after {done['t']:.2f} s", flush=True)
agent.terminate(); agent.wait()
shutil.rmtree(d)

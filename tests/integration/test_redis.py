#!/usr/bin/python3
"""test_redis.py - the Redis job store (--job-store redis://...) against a real
redis-server on a free port.

usage: /usr/bin/python3 tests/integration/test_redis.py [--build DIR]

- two daemons share a job: created on one, polled, canceled and served by the
  other, the bytes those of a lone in-memory daemon given the same request
- SIGKILL of the daemon running a job: the other takes it over once the lease
  lapses and finishes it with the same bytes
- Redis killed: job routes answer 503 job_store_unavailable with Retry-After,
  scoring still works, /readyz and /metrics say so; Redis restarted (its
  append-only file kept the data): the job routes recover and a job finished
  before the restart is still served
- a wrong password stops the daemon at start with a clear error
"""
import argparse
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import jemtest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAILS = []
J = {"Content-Type": "application/json"}
PASSWORD = "s3cret-test"


def check(cond, what):
    print(("  ok   " if cond else "FAIL: ") + what, flush=True)
    if not cond:
        FAILS.append(what)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


class Redis:
    def __init__(self, tmp):
        self.port, self.dir = free_port(), tmp
        self.proc = None

    def start(self):
        # the append-only file, fsynced on every write, survives a SIGKILL
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes", "--appendfsync", "always", "--dir", self.dir,
             "--requirepass", PASSWORD], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(100):
            if self.cli("PING") == "PONG":
                return
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def cli(self, *args):
        p = subprocess.run(["redis-cli", "-p", str(self.port), "-a", PASSWORD,
                            "--no-auth-warning", *args], capture_output=True, text=True)
        return p.stdout.strip()

    def url(self, password=PASSWORD):
        return "redis://:%s@127.0.0.1:%d" % (password, self.port)


def create(d, body):
    st, h, o = d.json("POST", "/v1/samples", json.dumps(body), J)
    return st, h, o


def wait_done(d, jid, timeout=60):
    end = time.time() + timeout
    o = None
    while time.time() < end:
        st, _, o = d.json("GET", "/v1/jobs/" + jid)
        if st == 200 and o["status"] not in ("queued", "running"):
            return o
        time.sleep(0.05)
    return o


def results(d, jid, n):
    files = [d.request("GET", "/v1/jobs/%s/grid.png" % jid)[2],
             d.request("GET", "/v1/jobs/%s/samples.npy" % jid)[2]]
    files += [d.request("GET", "/v1/jobs/%s/samples/%d.png" % (jid, k))[2] for k in range(n)]
    return files


def same_job_json(a, b):
    """The job objects of two runs of one request, ids and times aside."""
    def strip(o):
        o = json.loads(json.dumps(o))
        for k in ("id", "url", "created_at", "started_at", "finished_at"):
            o.pop(k, None)
        for s in (o.get("result") or {}).get("samples", []):
            s.pop("url", None)
        if o.get("result"):
            o["result"].pop("grid_url", None)
            o["result"].pop("npy_url", None)
        return o
    return strip(a) == strip(b)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default="build")
    a = ap.parse_args()
    b = a.build if os.path.isabs(a.build) else os.path.join(ROOT, a.build)
    jemd = os.path.join(b, "jemd")
    t0 = time.time()
    tmp = tempfile.mkdtemp(prefix="jem_redis_")
    daemons = []
    redis = Redis(tmp)

    def start(*args, store=None):
        extra = ["--job-store", store] if store else []
        d = jemtest.Daemon(jemd, model, "--workers", "1", "--blas-threads", "1",
                           "--job-lease-ms", "1000", *extra, *args)
        daemons.append(d)
        return d

    try:
        model = os.path.join(tmp, "a.safetensors")
        jemtest.write_model(model, seed=3, name="a", ood=False, scale=2.0)
        try:
            redis.start()
        except FileNotFoundError:
            check(False, "redis-server is installed (make deps installs it)")
            return 1
        mem = start()
        da, db = start(store=redis.url()), start(store=redis.url())

        print("== two daemons share a job")
        st, _, o = db.json("GET", "/readyz")
        check(st == 200 and o.get("job_store") == {"kind": "redis", "state": "ok"},
              "/readyz states the store (%s)" % o)
        body = {"n": 4, "steps": 20, "seed": 11}
        st, h, o = create(da, body)
        check(st == 202 and h.get("location", "").startswith("/v1/jobs/"),
              "POST /v1/samples on A -> 202 (%s)" % st)
        jid = o["id"]
        st_m, _, om = create(mem, body)
        ob = wait_done(db, jid)
        check(ob and ob["status"] == "succeeded", "B sees A's job succeed (%s)" %
              (ob and ob["status"]))
        om = wait_done(mem, om["id"])
        check(same_job_json(ob, om), "the job object matches the in-memory daemon's")
        ra, rb, rm = results(da, jid, 4), results(db, jid, 4), results(mem, om["id"], 4)
        check(ra == rb == rm and all(len(x) > 50 for x in ra),
              "grid, .npy and every PNG are byte-identical on A, B and a lone memory daemon")
        owner = redis.cli("TTL", "jemd:job:" + jid)
        check(owner.isdigit() and 0 < int(owner) <= 3600,
              "a finished job's key expires with --job-ttl (TTL %s)" % owner)
        imgs = [base64.b64encode(x).decode() for x in jemtest.test_images(2, seed=5)]
        body = {"steps": 5, "seed": 3, "init": {"images": imgs}}
        st, _, o = create(db, body)
        _, _, om = create(mem, body)
        o, om = wait_done(da, o["id"]) if st == 202 else None, wait_done(mem, om["id"])
        check(o and o["status"] == "succeeded" and same_job_json(o, om) and
              results(da, o["id"], 2) == results(mem, om["id"], 2),
              "a job from given init images (stored with it) gives the memory daemon's bytes")
        st, _, o = create(db, {"n": 2, "steps": 2000, "seed": 1})
        jid2 = o["id"]
        st, _, o = da.json("DELETE", "/v1/jobs/" + jid2)
        check(st == 200 and o["status"] == "canceled", "DELETE on A cancels B's job (%s)" % st)
        st, _, o = db.json("GET", "/v1/jobs/" + jid2)
        check(st == 404, "then GET on B -> 404 (%s)" % st)

        print("== SIGKILL of the replica running a job")
        body = {"n": 4, "steps": 120, "seed": 21}
        st, _, o = create(da, body)
        jid = o["id"]
        st_m, _, om = create(mem, body)
        owner, step = "", 0
        end = time.time() + 30
        while time.time() < end and not (owner and step >= 5):
            owner = redis.cli("HGET", "jemd:job:" + jid, "owner")
            s = redis.cli("HGET", "jemd:job:" + jid, "step")
            step = int(s) if s.isdigit() else 0
            time.sleep(0.02)
        pid = int(owner.split(":")[1]) if owner.count(":") == 2 else -1
        victim = da if da.proc.pid == pid else db if db.proc.pid == pid else None
        check(victim is not None and step >= 5, "a replica runs the job (step %d)" % step)
        if victim is not None:
            other = db if victim is da else da
            victim.proc.send_signal(signal.SIGKILL)
            victim.proc.wait()
            t_kill = time.time()
            o = wait_done(other, jid)
            check(o and o["status"] == "succeeded",
                  "the other replica took it over and finished it in %.1f s (%s)"
                  % (time.time() - t_kill, o and o["status"]))
            om = wait_done(mem, om["id"])
            check(results(other, jid, 4) == results(mem, om["id"], 4) and same_job_json(o, om),
                  "its files and job object are those of a lone memory daemon")
            _, _, m = other.request("GET", "/metrics")
            check(b"jem_job_takeovers_total 1" in m, "the take-over is counted")
            db = other
            da = start(store=redis.url())

        print("== Redis killed and restarted")
        done_id, done_files = jid, results(db, jid, 4)
        redis.kill()
        st, h, o = db.json("GET", "/v1/jobs/" + done_id)
        check(st == 503 and o["error"]["code"] == "job_store_unavailable" and
              h.get("retry-after"), "GET a job -> 503 job_store_unavailable + Retry-After "
              "(%s %s)" % (st, o))
        st, h, o = create(da, {"n": 2, "steps": 5})
        check(st == 503 and o["error"]["code"] == "job_store_unavailable",
              "POST /v1/samples -> 503 job_store_unavailable (%s)" % st)
        png = jemtest.test_images(1)[0]
        st, _, _ = db.request("POST", "/v1/classify", png, {"Content-Type": "image/png"})
        check(st == 200, "scoring still answers 200 (%s)" % st)
        st, _, o = db.json("GET", "/readyz")
        check(st == 200 and o["job_store"]["state"] == "unavailable",
              "/readyz: ready, store unavailable (%s)" % o)
        _, _, m = db.request("GET", "/metrics")
        errs = [float(l.split()[1]) for l in m.decode().splitlines()
                if l.startswith("jem_job_store_errors_total ")]
        check(errs and errs[0] >= 1 and b"jem_job_store_up 0" in m,
              "/metrics counts the store errors (%s)" % errs)
        check(da.proc.poll() is None and db.proc.poll() is None, "both daemons keep running")
        redis.start()
        end, st = time.time() + 15, 0
        while time.time() < end and st != 200:
            st, _, o = db.json("GET", "/v1/jobs/" + done_id)
            time.sleep(0.1)
        check(st == 200 and o["status"] == "succeeded",
              "after the restart the job routes recover; the finished job is still there")
        check(results(db, done_id, 4) == done_files, "with the same bytes")
        st, _, o = create(da, {"n": 2, "steps": 5, "seed": 2})
        o = wait_done(db, o["id"]) if st == 202 else None
        check(o and o["status"] == "succeeded", "and new jobs run again")

        print("== a job runs on the model it names")
        da.kill()
        db.kill()
        model_b = os.path.join(tmp, "b.safetensors")
        jemtest.write_model(model_b, seed=4, name="b", ood=False, scale=2.0)
        dc = start("--model", model_b, "--max-steps", "1000000", store=redis.url())  # a, b; 1 job
        st, _, o = create(dc, {"n": 2, "steps": 5, "seed": 4, "model": "b"})
        o = wait_done(dc, o["id"]) if st == 202 else None
        check(o and o["status"] == "succeeded" and o.get("model") == "b",
              "a job naming model b runs on b (%s)" % str(o and (o["status"], o.get("model"))))
        st, _, busy = create(dc, {"n": 2, "steps": 100000, "seed": 1, "model": "a"})
        end = time.time() + 20
        while time.time() < end and redis.cli("HGET", "jemd:job:" + busy["id"], "owner") == "":
            time.sleep(0.02)
        st, _, o = create(dc, {"n": 2, "steps": 5, "seed": 4, "model": "b"})
        dd = start(store=redis.url())  # serves only a: claims the queued job naming b
        o = wait_done(dd, o["id"]) if st == 202 else None
        msg = ((o or {}).get("error") or {}).get("message", "")
        check(o and o["status"] == "failed" and "model 'b' is not loaded" in msg,
              "a replica without the job's model fails it, saying why (%s: %s)"
              % (o and o["status"], msg))
        dc.json("DELETE", "/v1/jobs/" + busy["id"])
        check(dc.proc.poll() is None and dd.proc.poll() is None, "both replicas keep running")

        print("== wrong password")
        p = subprocess.run([jemd, "--model", model, "--port", "0", "--job-store",
                            redis.url("wrong")], capture_output=True, text=True, timeout=30)
        check(p.returncode != 0 and "refused the credentials" in p.stderr,
              "a wrong password stops the daemon with a clear error (%d: %s)"
              % (p.returncode, p.stderr.strip()[-160:]))
        p = subprocess.run([jemd, "--model", model, "--port", "0", "--job-store", "mysql://x"],
                           capture_output=True, text=True, timeout=30)
        check(p.returncode != 0 and "expected memory or redis://" in p.stderr,
              "an unknown store is refused (%d)" % p.returncode)
        for d in daemons:
            if d.proc.poll() is None:
                d.signal(signal.SIGTERM)
                rc = d.wait(30)
                check(rc == 0, "daemon exits 0 after SIGTERM (%s)" % rc)
            d._t.join(5)
            bad = [l for l in d.lines if "Sanitizer" in l or "runtime error:" in l]
            check(not bad, "no sanitizer report in the daemon's stderr %s" % bad[:2])
    finally:
        for d in daemons:
            d.kill()
        redis.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    print("test_redis: %d failure(s), %.1f s" % (len(FAILS), time.time() - t0))
    return 1 if FAILS else 0


if __name__ == "__main__":
    sys.exit(main())

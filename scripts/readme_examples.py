#!/usr/bin/python3
"""readme_examples.py - reruns the README's "Examples" console blocks against
a real daemon on the shipped model and rewrites their output in place, so that
the examples stay real answers of the shipped model.

usage: /usr/bin/python3 scripts/readme_examples.py [--build build] [--check]

Starts build/jemd on models/fmnist-jem.safetensors at localhost:8080, runs
every `$ ` command of the ```console blocks between "## Examples" and the next
"## " heading with bash, in order, and replaces each block's output.  A job id
printed by the POST /v1/samples example replaces the old id in the later
commands, which wait for the job to finish.  --check only reports whether the
README would change (outputs with dates, ids and request ids always differ).
"""
import argparse
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOB_ID = re.compile(r"/v1/jobs/([0-9a-f]{32})")


def wait_ready(url, timeout=60):
    end = time.time() + timeout
    while time.time() < end:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return True
        except OSError:
            time.sleep(0.2)
    return False


def wait_job(job, timeout=120):
    end = time.time() + timeout
    while time.time() < end:
        try:
            with urllib.request.urlopen(f"http://localhost:8080/v1/jobs/{job}", timeout=5) as r:
                if b'"succeeded"' in r.read():
                    return
        except urllib.error.HTTPError as e:
            if e.code == 404:  # deleted by an earlier example
                return
            raise
        time.sleep(0.3)
    sys.exit(f"readme_examples.py: job {job} did not finish")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default="build")
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    path = os.path.join(ROOT, "README.md")
    text = open(path).read()
    start = text.index("## Examples")
    stop = text.index("\n## ", start + 1)
    section = text[start:stop]

    jemd = os.path.join(ROOT, args.build, "jemd")
    d = subprocess.Popen([jemd, "--model", os.path.join(ROOT, "models", "fmnist-jem.safetensors"),
                          "--port", "8080"], cwd=ROOT, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    try:
        if not wait_ready("http://localhost:8080/readyz"):
            sys.exit("readme_examples.py: jemd did not become ready on :8080")
        old_id = new_id = None

        def rerun(m):
            nonlocal old_id, new_id
            cmd = m.group(1)
            if old_id and new_id and old_id in cmd:
                cmd = cmd.replace(old_id, new_id)
                wait_job(new_id)
            out = subprocess.run(["bash", "-c", cmd], cwd=ROOT, capture_output=True,
                                 text=True).stdout
            if "POST" in cmd and "/v1/samples" in cmd:
                old = JOB_ID.search(m.group(2) or "")
                new = JOB_ID.search(out)
                if old and new:
                    old_id, new_id = old.group(1), new.group(1)
            if out and not out.endswith("\n"):
                out += "\n"  # curl prints bodies without a final newline
            return f"```console\n$ {cmd}\n{out}```"
        new_section = re.sub(r"```console\n\$ (.*)\n((?:(?!```)[\s\S])*)```", rerun, section)
    finally:
        d.terminate()
        d.wait(timeout=30)
    if args.check:
        print("README examples " + ("unchanged" if new_section == section else "differ"))
        return 0
    with open(path + ".tmp", "w") as f:
        f.write(text[:start] + new_section + text[stop:])
    os.replace(path + ".tmp", path)
    print("README.md: examples rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())

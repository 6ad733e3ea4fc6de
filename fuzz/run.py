#!/usr/bin/python3
"""run.py - runs every built libFuzzer harness for a fixed time; fails if any crashes.

Usage (what `make fuzz` does):
    /usr/bin/python3 fuzz/run.py --dir build/fuzz/fuzz --seconds 60

Each executable fuzz_NAME in --dir runs for --seconds with its committed seed
corpus fuzz/corpus/NAME/ (read only: new inputs go to a scratch directory,
so the repository's corpus stays small).  A crash, leak, sanitizer report or
timeout leaves its input in build/fuzz/artifacts/ and makes this script exit 1.
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default=os.path.join(ROOT, "build", "fuzz", "fuzz"))
    ap.add_argument("--seconds", type=int, default=60)
    ap.add_argument("--only", help="run just this harness (e.g. fuzz_image)")
    args = ap.parse_args()

    if not os.path.isdir(args.dir):
        print("run.py: no fuzzer directory %s (run `make MODE=fuzz fuzzers`)" % args.dir,
              file=sys.stderr)
        return 1
    names = sorted(n for n in os.listdir(args.dir)
                   if n.startswith("fuzz_") and os.access(os.path.join(args.dir, n), os.X_OK)
                   and os.path.isfile(os.path.join(args.dir, n)))
    if args.only:
        names = [n for n in names if n == args.only]
    if not names:
        print("run.py: no fuzz_* executables in %s" % args.dir, file=sys.stderr)
        return 1

    artifacts = os.path.join(ROOT, "build", "fuzz", "artifacts")
    os.makedirs(artifacts, exist_ok=True)
    ok = bad = 0
    for name in names:
        exe = os.path.join(args.dir, name)
        seeds = os.path.join(HERE, "corpus", name[len("fuzz_"):])
        scratch = tempfile.mkdtemp(prefix="jem_%s_" % name)
        cmd = [exe, "-max_total_time=%d" % args.seconds, "-timeout=10", "-rss_limit_mb=2048",
               "-print_final_stats=1", "-artifact_prefix=%s/%s-" % (artifacts, name), scratch]
        if os.path.isdir(seeds):
            cmd.append(seeds)
        else:
            print("run.py: %s has no seed corpus at %s" % (name, seeds), file=sys.stderr)
        print("== %s (%d s)" % (name, args.seconds), flush=True)
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, errors="replace",
                               timeout=args.seconds + 120, stdin=subprocess.DEVNULL)
            rc, log = p.returncode, p.stdout + p.stderr
        except subprocess.TimeoutExpired as e:
            rc, log = -1, (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
            log += "\nrun.py: %s did not stop on its own" % name
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        runs = re.search(r"stat::number_of_executed_units:\s*(\d+)", log)
        cov = re.findall(r"cov: (\d+)", log)
        if rc == 0:
            ok += 1
            print("   ok: %s runs, coverage %s" % (runs.group(1) if runs else "?",
                                                 cov[-1] if cov else "?"))
        else:
            bad += 1
            print("   FAILED (exit %d); last output:" % rc)
            print("\n".join(log.splitlines()[-40:]))
    print("%d passed, %d failed" % (ok, bad))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

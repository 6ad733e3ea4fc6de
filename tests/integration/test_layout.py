#!/usr/bin/python3
"""test_layout.py - the source tree's structure stays as issue 23 left it.

usage: /usr/bin/python3 tests/integration/test_layout.py [--build DIR]

- No call circle among server/ files: the symbols each object file of
  DIR/obj/server defines and uses (nm) give a graph file -> file, which must
  have no cycle (metrics.c pulls nothing, handlers call http.c and never the
  other way round, http.c gets the route table from main.c).
- No source in core/ (core/internal/ included), cli/ or server/ over 800
  lines unless its opening comment says why (a line with "long because").
"""
import argparse
import glob
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MAX_LINES = 800
SOURCE_DIRS = ["core", "core/internal", "cli", "server"]


def graph(objdir):
    defs, uses = {}, {}
    for o in sorted(glob.glob(os.path.join(objdir, "*.o"))):
        f = os.path.basename(o)[:-2]
        out = subprocess.run(["nm", o], capture_output=True, text=True, check=True).stdout
        defs[f], uses[f] = set(), set()
        for line in out.splitlines():
            p = line.split()
            if len(p) == 3 and p[1] in "TDBR":
                defs[f].add(p[2])
            elif len(p) == 2 and p[0] == "U":
                uses[f].add(p[1])
    owner = {s: f for f in defs for s in defs[f]}
    return {f: sorted({owner[s] for s in uses[f] if s in owner and owner[s] != f}) for f in defs}


def find_cycle(g):
    state, stack = {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in g.get(n, []):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                c = visit(m)
                if c:
                    return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(g):
        if n not in state:
            c = visit(n)
            if c:
                return c
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default="build")
    a = ap.parse_args()
    fails = 0
    objdir = os.path.join(a.build, "obj", "server")
    g = graph(objdir)
    if len(g) < 10:
        print("FAIL found only %d server objects in %s (build first)" % (len(g), objdir))
        return 1
    cyc = find_cycle(g)
    if cyc:
        fails += 1
        print("FAIL server files call each other in a circle: %s" % " -> ".join(cyc))
    else:
        print("  ok   no call circle among %d server files" % len(g))
    long_fails, n_files = 0, 0
    for d in SOURCE_DIRS:
        for path in sorted(glob.glob(os.path.join(ROOT, d, "*.[ch]"))):
            n_files += 1
            with open(path, encoding="utf-8") as f:
                lines = f.read().split("\n")
            head = "\n".join(lines[:40])
            if len(lines) > MAX_LINES and "long because" not in head:
                long_fails += 1
                print("FAIL %s has %d lines and no reason at its top ('long because')"
                      % (os.path.relpath(path, ROOT), len(lines)))
    if n_files < 50:
        long_fails += 1
        print("FAIL found only %d sources under %s" % (n_files, ", ".join(SOURCE_DIRS)))
    if not long_fails:
        print("  ok   none of %d files in %s over %d lines without a reason"
              % (n_files, ", ".join(SOURCE_DIRS), MAX_LINES))
    fails += long_fails
    print("test_layout: %d failure(s)" % fails)
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())

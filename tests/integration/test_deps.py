#!/usr/bin/python3
"""test_deps.py - `make deps` installs every Debian package that `make run` and
`make test` use (issue 25: procps, for /usr/bin/kill, was missing).

usage: /usr/bin/python3 tests/integration/test_deps.py [--build DIR]

Reads the commands the tests run (subprocess calls with a literal program
name, shutil.which lookups) and the Python modules they and the scripts they
call import, finds the installed package of each (dpkg -S), and checks that
the package is one a newcomer's machine has or `make deps` brings: Debian 12's
required packages, the README's base (build-essential, git, pkg-config, curl,
python3, nodejs, npm), the Makefile's DEPS_BUILD, or a dependency of those
(closure over the installed packages' Depends and Pre-Depends).  A command a
test looks up in a condition (`if shutil.which(...)`: kubectl, which no Debian
package ships) is optional and not checked.  scripts/fresh_check.sh is the
end-to-end version of this check, on a real minimal root.
"""
import argparse
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BASE = {"build-essential", "git", "pkg-config", "curl", "python3", "nodejs", "npm", "apt"}
# what the Makefile's recipes run for `make run` and `make test`
MAKE_COMMANDS = {"make", "cc", "ar", "pkg-config", "install", "sed", "find", "cmp", "dpkg-query",
                 "apt-get", "bash"}
# the scripts the tests run, whose imports count too
SCRIPTS = ["scripts/make_ood_sets.py"]

RESULTS = {True: [], False: []}  # passed and failed checks


def check(cond, what):
    RESULTS[bool(cond)].append(what)
    if not cond:
        print("FAIL:", what, file=sys.stderr)
    return cond


def makefile_deps():
    text = open(os.path.join(ROOT, "Makefile")).read().replace("\\\n", " ")
    m = re.search(r"^DEPS_BUILD\s*:=(.*)$", text, re.M)
    return set(m.group(1).split()) if m else set()


def installed():
    """name -> (priority, essential, [[alternatives], ...], provides) of installed packages."""
    out = subprocess.run(["dpkg-query", "-W", "-f",
                          "${db:Status-Abbrev}\t${Package}\t${Priority}\t${Essential}\t"
                          "${Pre-Depends}, ${Depends}\t${Provides}\n"],
                         capture_output=True, text=True, check=True).stdout
    pk = {}
    for line in out.splitlines():
        st, name, prio, ess, deps, prov = (line.split("\t") + [""] * 6)[:6]
        if not st.startswith("ii"):
            continue
        alts = [[re.sub(r"[\s(:].*", "", a.strip()) for a in d.split("|") if a.strip()]
                for d in deps.split(",") if d.strip()]
        provides = [re.sub(r"[\s(:].*", "", p.strip()) for p in prov.split(",") if p.strip()]
        pk[name] = (prio, ess == "yes", alts, provides)
    return pk


def closure(roots, pk):
    providers = {}
    for name, (_, _, _, provides) in pk.items():
        for p in provides:
            providers.setdefault(p, set()).add(name)
    seen, todo = set(), [r for r in roots if r in pk]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        for alts in pk[n][2]:
            for a in alts:  # every installed alternative may be the one that counts
                for c in ({a} if a in pk else set()) | providers.get(a, set()):
                    if c not in seen:
                        todo.append(c)
    return seen


def aliases(path):
    """path and its /bin <-> /usr/bin (sbin, lib) twin: dpkg knows one of them (usrmerge)."""
    out = [path]
    for a, b in (("/usr/bin/", "/bin/"), ("/usr/sbin/", "/sbin/"), ("/usr/lib/", "/lib/")):
        if path.startswith(a):
            out.append(b + path[len(a):])
        elif path.startswith(b):
            out.append(a + path[len(b):])
    return out


def owners(paths):
    """path -> the package that ships it (one dpkg -S for all), None when none does."""
    want = {a: p for p in paths for a in aliases(p)}
    r = subprocess.run(["dpkg", "-S", *want], capture_output=True, text=True)
    found = {}
    for line in r.stdout.splitlines():
        pkgs, _, f = line.partition(": ")
        if f in want:
            found.setdefault(want[f], pkgs.split(",")[0].split(":")[0].strip())
    return {p: found.get(p) for p in paths}


def test_sources():
    srcs = [os.path.join(ROOT, "tests", "integration", f)
            for f in sorted(os.listdir(os.path.join(ROOT, "tests", "integration")))
            if f.endswith(".py")]
    return srcs + [os.path.join(ROOT, s) for s in SCRIPTS]


def used_commands():
    need, optional = set(MAKE_COMMANDS), set()
    for path in test_sources():
        text = open(path).read()
        need |= set(re.findall(r"subprocess\.\w+\(\s*\[\s*\"([\w.+-]+)\"", text))
        need |= set(re.findall(r"shutil\.which\(\"([\w.+-]+)\"\)", text))
        # looked up in a condition: the test adapts when it is absent
        optional |= set(re.findall(r"\b(?:if|and|or|not)\s+shutil\.which\(\"([\w.+-]+)\"\)",
                                   text))
    return need - optional, optional


def used_modules():
    mods = set()
    for path in test_sources():
        for m in re.finditer(r"^\s*(?:import|from)\s+([A-Za-z_]\w*)", open(path).read(), re.M):
            mods.add(m.group(1))
    local = {os.path.splitext(f)[0]
             for d in (("tests", "integration"), ("scripts",), ("clients", "python"))
             for f in os.listdir(os.path.join(ROOT, *d))}
    return sorted(m for m in mods - local if m not in sys.stdlib_module_names)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default="build")  # unused: the same interface as the others
    ap.parse_args()
    if not shutil.which("dpkg"):
        print("test_deps: not a Debian system (no dpkg); nothing to check")
        print("0 passed, 0 failed")
        return 0
    pk = installed()
    deps = makefile_deps()
    roots = BASE | deps | {n for n, (prio, ess, _, _) in pk.items() if prio == "required" or ess}
    have = closure(roots, pk)
    need, optional = used_commands()
    check(len(need) > len(MAKE_COMMANDS), "the tests' commands were found: %s" % sorted(need))
    paths = {}
    for cmd in sorted(need):
        path = shutil.which(cmd)
        if check(path, "the tests need `%s`, which is not installed" % cmd):
            paths[cmd] = os.path.realpath(path)
    specs = {m: importlib.util.find_spec(m) for m in used_modules()}
    for mod, spec in specs.items():
        check(spec is not None and spec.origin, "Python module %s is importable" % mod)
    mod_paths = {m: os.path.realpath(sp.origin) for m, sp in specs.items() if sp and sp.origin}
    pkg_of = owners(list(paths.values()) + list(mod_paths.values()))
    for cmd, path in paths.items():
        check(pkg_of[path] in have, "`%s` (%s, package %s) is neither in the base system nor "
              "brought by `make deps`: add it to DEPS_BUILD" % (cmd, path, pkg_of[path]))
    for mod, path in mod_paths.items():
        check(pkg_of[path] in have, "Python module %s (%s, package %s) is not brought by "
              "`make deps`" % (mod, path, pkg_of[path]))
    print("optional, not checked: %s" % ", ".join(sorted(optional)))
    # a missing package, without root and without sudo: a sentence, not apt's lock error.
    # The Makefile is copied where any user may read it (a checkout under /root is not).
    if os.getuid() == 0 and shutil.which("setpriv") and not shutil.which("sudo"):
        with tempfile.TemporaryDirectory() as tmp:
            os.chmod(tmp, 0o755)
            shutil.copy(os.path.join(ROOT, "Makefile"), tmp)
            r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                                shutil.which("make"), "-s", "deps",
                                "DEPS_BUILD=jemd-no-such-package"], cwd=tmp, capture_output=True,
                               text=True, stdin=subprocess.DEVNULL, timeout=60)
        check(r.returncode != 0 and "needs root (or sudo): jemd-no-such-package" in r.stderr,
              "make deps as a user without sudo names the packages it needs root for: %s"
              % r.stderr.strip()[-200:])
    print("%d passed, %d failed" % (len(RESULTS[True]), len(RESULTS[False])))
    return 1 if RESULTS[False] else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/python3
"""test_deploy.py - checks deploy/: `make install` into a temporary root and
`systemd-analyze verify`/`security` on the unit there; every Kubernetes
manifest parsed and its probes, ports, resources, security context and grace
period checked; the Dockerfile's rules; and every flag, JEMD_* variable, port
and probe path in the deploy files against `jemd --help`, openapi.yaml and a
running daemon.  Usage: test_deploy.py --build DIR"""
import argparse
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DEPLOY = REPO / "deploy"
UNIT = DEPLOY / "systemd" / "jemd.service"
ENV_EXAMPLE = DEPLOY / "systemd" / "jemd.env.example"
DOCKERFILE = DEPLOY / "container" / "Dockerfile"
IGNOREFILE = DEPLOY / "container" / "Dockerfile.dockerignore"
BUILD_SH = DEPLOY / "container" / "build.sh"
HEALTHCHECK_C = DEPLOY / "container" / "healthcheck.c"
K8S = DEPLOY / "k8s"
MAX_EXPOSURE = 2.0
PROBE_PORT_NAME = "http"

failures = []


def check(cond, what):
    if not cond:
        failures.append(what)
        print("  FAIL: " + what)
    return cond


# ---------------------------------------------------------------------------
# What the daemon offers: flags, variables and defaults from `jemd --help`.
class Help:
    def __init__(self, jemd):
        self.jemd = jemd
        self.flags = {}     # "--port" -> "JEMD_PORT" (or None for --help/--version)
        self.envs = {}      # "JEMD_PORT" -> default string
        try:
            r = subprocess.run([str(jemd), "--help"], capture_output=True, text=True,
                               timeout=20)
            self.text, self.rc = r.stdout, r.returncode
        except (OSError, subprocess.TimeoutExpired) as e:
            self.text, self.rc = "", str(e)
        cur = None
        for line in self.text.splitlines():
            m = re.match(r"\s+(--[a-z0-9][a-z0-9-]*)", line)
            if m:
                cur = m.group(1)
                self.flags[cur] = None
            m = re.search(r"\[(JEMD_[A-Z0-9_]+); default: ([^\]]*)\]", line)
            if m and cur:
                self.flags[cur] = m.group(1)
                self.envs[m.group(1)] = m.group(2)

    def real(self):
        return self.rc == 0 and {"--host", "--port", "--model", "--drain-seconds"} <= set(self.flags)

    def accepts(self, args, env):
        """Runs `jemd ARGS --help` with ENV: the daemon parses and range-checks
        every variable and flag before it prints help, so rc 0 means valid."""
        e = {"PATH": "/usr/bin:/bin"}
        e.update(env)
        r = subprocess.run([str(self.jemd), *args, "--help"], capture_output=True, text=True,
                           env=e, timeout=20)
        return r.returncode, r.stderr.strip()


def flags_in(args):
    return [a.split("=", 1)[0] for a in args if a.startswith("--")]


def flag_value(args, flag):
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def check_names(help_, where, flags, envs):
    for f in flags:
        check(f in help_.flags, f"{where}: flag {f} is not in `jemd --help`")
    for e in envs:
        if e.startswith("JEMD_"):
            check(e in help_.envs, f"{where}: variable {e} is not in `jemd --help`")


# ---------------------------------------------------------------------------
def parse_unit(path):
    """systemd unit -> {section: [(key, value)]}, with continuations joined."""
    out, sec, buf = {}, None, ""
    for raw in path.read_text().splitlines():
        line = buf + raw
        if line.endswith("\\"):
            buf = line[:-1] + " "
            continue
        buf = ""
        s = line.strip()
        if not s or s[0] in "#;":
            continue
        if s.startswith("["):
            sec = s.strip("[]")
            out.setdefault(sec, [])
            continue
        k, _, v = s.partition("=")
        out[sec].append((k.strip(), v.strip()))
    return out


def unit_get(unit, sec, key):
    return [v for k, v in unit.get(sec, []) if k == key]


def seconds(v):
    m = re.fullmatch(r"(\d+)\s*(s|sec|min|m)?", v.strip())
    if not m:
        raise ValueError(f"cannot read a time span from '{v}'")
    return int(m.group(1)) * (60 if m.group(2) in ("min", "m") else 1)


def env_file(path, include_commented):
    """KEY=value lines of an environment file (optionally the #KEY=value ones)."""
    out = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^(#)?([A-Z][A-Z0-9_]*)=(.*)$", line.strip())
        if m and (include_commented or not m.group(1)):
            out[m.group(2)] = m.group(3).strip().strip('"')
    return out


def unit_environment(unit):
    env = {}
    for v in unit_get(unit, "Service", "Environment"):
        for item in shlex.split(v):
            k, _, val = item.partition("=")
            env[k] = val
    return env


def test_unit_text(help_):
    print("== systemd unit and environment example")
    unit = parse_unit(UNIT)
    svc = dict(unit.get("Service", []))
    check(svc.get("Type") == "notify", "unit: Type=notify (jemd sends READY=1)")
    check(svc.get("DynamicUser") == "yes", "unit: DynamicUser=yes")
    check(svc.get("Restart") == "on-failure", "unit: Restart=on-failure")
    check(unit_get(unit, "Unit", "StartLimitBurst") and unit_get(unit, "Unit", "StartLimitIntervalSec"),
          "unit: restart limits (StartLimitBurst/StartLimitIntervalSec in [Unit])")
    for k in ("MemoryMax", "TasksMax", "LimitNOFILE"):
        check(k in svc, f"unit: resource limit {k}")
    check(svc.get("KillMode") == "mixed", "unit: KillMode=mixed")
    check(svc.get("ExecReload") == "/bin/kill -HUP $MAINPID", "unit: ExecReload sends SIGHUP")
    check("-@SYSCONFDIR@/default/jemd" in unit_get(unit, "Service", "EnvironmentFile"),
          "unit: EnvironmentFile=-@SYSCONFDIR@/default/jemd")
    check("OPENBLAS_CORETYPE" not in "".join(v for k, v in unit["Service"]),
          "unit: must not force OPENBLAS_CORETYPE")
    execstart = shlex.split(svc.get("ExecStart", ""))
    check(execstart[:1] == ["@PREFIX@/bin/jemd"], "unit: ExecStart runs @PREFIX@/bin/jemd")

    env = unit_environment(unit)
    example_all = env_file(ENV_EXAMPLE, include_commented=True)
    example_set = env_file(ENV_EXAMPLE, include_commented=False)
    check_names(help_, "jemd.service", flags_in(execstart[1:]), env)
    check_names(help_, "jemd.env.example", [], example_all)
    check(not any(k == "OPENBLAS_CORETYPE" for k in example_set),
          "jemd.env.example must not set OPENBLAS_CORETYPE")
    if not help_.real():
        return
    # The values parse: unit defaults overridden by the example (as systemd does).
    eff = dict(env)
    eff.update(example_set)
    eff["JEMD_MODEL"] = eff.get("JEMD_MODEL", "").replace("@PREFIX@", "/usr")
    rc, err = help_.accepts(execstart[1:], eff)
    check(rc == 0, f"jemd rejects the unit's settings: {err}")
    every = dict(eff)
    every.update(example_all)
    rc, err = help_.accepts([], every)
    check(rc == 0, f"jemd rejects a value in jemd.env.example: {err}")
    host = flag_value(execstart, "--host") or eff.get("JEMD_HOST") or help_.envs["JEMD_HOST"]
    check(host in ("0.0.0.0", "::"), f"unit: listens on {host}, deploy files must set 0.0.0.0")
    drain = int(flag_value(execstart, "--drain-seconds") or eff.get("JEMD_DRAIN_SECONDS")
                or help_.envs["JEMD_DRAIN_SECONDS"])
    delay = int(flag_value(execstart, "--drain-delay") or eff.get("JEMD_DRAIN_DELAY")
                or help_.envs.get("JEMD_DRAIN_DELAY", "0"))
    stop = seconds(svc.get("TimeoutStopSec", "90"))
    check(stop > drain + delay,
          f"unit: TimeoutStopSec ({stop} s) must exceed drain delay + drain ({delay}+{drain} s)")


def test_install_and_systemd(build):
    print("== make install + systemd-analyze")
    if not check(shutil.which("systemd-analyze") is not None,
                 "systemd-analyze is missing (Debian package systemd; `make deps`)"):
        return
    mode = "release" if build.resolve() == (REPO / "build").resolve() else build.name
    with tempfile.TemporaryDirectory(prefix="jemd-install-") as tmp:
        root = Path(tmp) / "root"
        r = subprocess.run(["make", "-s", "-C", str(REPO), f"MODE={mode}", "install",
                            f"DESTDIR={root}", "PREFIX=/usr"],
                           capture_output=True, text=True, timeout=600)
        if not check(r.returncode == 0, "make install DESTDIR=... PREFIX=/usr failed: "
                     + (r.stderr.strip() or r.stdout.strip())[-800:]):
            return
        unit = root / "usr/lib/systemd/system/jemd.service"
        for rel in ("usr/bin/jem", "usr/bin/jemd", "usr/share/jemd/models/fmnist-jem.safetensors",
                    "usr/lib/systemd/system/jemd.service", "etc/default/jemd",
                    "usr/share/doc/jemd/jemd.env.example"):
            check((root / rel).is_file(), f"make install did not install /{rel}")
        if not unit.is_file():
            return
        text = unit.read_text()
        check(re.search(r"@[A-Z]+@", text) is None,
              "installed unit still has an @PLACEHOLDER@")
        check(re.search(r"(?m)^ExecStart=/usr/bin/jemd(\s|$)", text) is not None,
              "installed unit: ExecStart=/usr/bin/jemd")
        check("JEMD_MODEL=/usr/share/jemd/models/fmnist-jem.safetensors" in text,
              "installed unit points JEMD_MODEL at the installed model")
        check(os.access(root / "usr/bin/jemd", os.X_OK), "installed jemd is not executable")
        # A second install must keep an edited /etc/default/jemd.
        (root / "etc/default/jemd").write_text("JEMD_PORT=9999\n")
        r = subprocess.run(["make", "-s", "-C", str(REPO), f"MODE={mode}", "install",
                            f"DESTDIR={root}", "PREFIX=/usr"],
                           capture_output=True, text=True, timeout=600)
        check(r.returncode == 0 and (root / "etc/default/jemd").read_text() == "JEMD_PORT=9999\n",
              "make install overwrote an existing /etc/default/jemd")

        # verify --root resolves the unit's dependencies (sysinit.target, ...)
        # and its commands inside the root, so give the root the host's
        # standard units and /usr/bin/kill, without touching what was installed.
        sysunits = Path("/lib/systemd/system")
        for src in sysunits.iterdir():
            dst = root / "usr/lib/systemd/system" / src.name
            if not dst.exists() and not dst.is_symlink():
                if src.is_symlink():
                    os.symlink(os.readlink(src), dst)
                elif src.is_dir():
                    shutil.copytree(src, dst, symlinks=True)
                else:
                    shutil.copy2(src, dst)
        for name in ("bin", "lib"):
            if not (root / name).exists():
                os.symlink("usr/" + name, root / name)
        shutil.copy2(shutil.which("kill") or "/usr/bin/kill", root / "usr/bin/kill")
        r = subprocess.run(["systemd-analyze", "verify", f"--root={root}",
                            "/usr/lib/systemd/system/jemd.service"],
                           capture_output=True, text=True, timeout=60)
        out = (r.stdout + r.stderr).strip()
        # verify exits 0 on ignored keys and bad values; any message is a finding.
        check(r.returncode == 0 and not out, f"systemd-analyze verify: rc {r.returncode}: {out}")
        print(f"  systemd-analyze verify --root: rc {r.returncode}, {len(out)} bytes of messages")

        r = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager",
                            str(unit)], capture_output=True, text=True, timeout=60)
        m = re.search(r"Overall exposure level for jemd\.service:\s*([0-9.]+)\s*(\S+)", r.stdout)
        if check(m is not None, "systemd-analyze security printed no exposure level: "
                 + r.stderr.strip()[-400:]):
            exposure = float(m.group(1))
            print(f"  systemd-analyze security --offline=true: exposure {exposure} {m.group(2)}")
            check(exposure <= MAX_EXPOSURE,
                  f"unit exposure {exposure} is above {MAX_EXPOSURE}: "
                  + ", ".join(l.split()[1] for l in r.stdout.splitlines() if "✗" in l))


# ---------------------------------------------------------------------------
def openapi_paths():
    for p in (REPO / "openapi.yaml", REPO / "server" / "openapi.yaml",
              REPO / "docs" / "openapi.yaml", REPO / "api" / "openapi.yaml"):
        if p.is_file():
            try:
                doc = yaml.safe_load(p.read_text())
            except yaml.YAMLError as e:
                check(False, f"{p} is not valid YAML: {e}")
                return p, {}
            return p, dict((doc or {}).get("paths") or {})
    return None, {}


def load_k8s():
    docs = {}
    for f in sorted(K8S.glob("*.yaml")):
        for d in yaml.safe_load_all(f.read_text()):
            if d is None:
                continue
            check(isinstance(d, dict) and "kind" in d and "apiVersion" in d,
                  f"{f.name}: a document without kind/apiVersion")
            docs.setdefault(d["kind"], []).append((f.name, d))
    return docs


def test_k8s(help_, routes):
    print("== Kubernetes manifests")
    docs = load_k8s()
    for kind in ("Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "StatefulSet"):
        check(len(docs.get(kind, [])) == 1, f"k8s: want exactly one {kind}")
    check(len(docs.get("Service", [])) == 2, "k8s: want two Services (jemd and its Redis)")
    if not docs.get("Deployment"):
        return
    _, dep = docs["Deployment"][0]
    name = dep["metadata"]["name"]
    tpl = dep["spec"]["template"]
    labels = tpl["metadata"]["labels"]
    sel = dep["spec"]["selector"]["matchLabels"]
    check(all(labels.get(k) == v for k, v in sel.items()), "Deployment selector does not match its pods")
    pod = tpl["spec"]
    cs = pod["containers"]
    check(len(cs) == 1, "Deployment: one container")
    c = cs[0]
    args = [str(a) for a in (c.get("command") or []) + (c.get("args") or [])]
    env = {e["name"]: str(e.get("value", "")) for e in c.get("env") or []}
    check_names(help_, "deployment.yaml", flags_in(args), env)
    check(flag_value(args, "--host") == "0.0.0.0" or env.get("JEMD_HOST") == "0.0.0.0",
          "Deployment: jemd must listen on 0.0.0.0 (--host 0.0.0.0)")
    if help_.real():
        rc, err = help_.accepts(args, env)
        check(rc == 0, f"jemd rejects the Deployment's args/env: {err}")

    ports = {p.get("name"): p["containerPort"] for p in c.get("ports") or []}
    port = int(flag_value(args, "--port") or env.get("JEMD_PORT")
               or (help_.envs.get("JEMD_PORT") if help_.real() else 8080) or 8080)
    check(port in ports.values(), f"Deployment: containerPort {sorted(ports.values())} != jemd port {port}")
    # probes go to --probe-port when there is one (it answers under connection exhaustion)
    pport = int(flag_value(args, "--probe-port") or env.get("JEMD_PROBE_PORT") or -1)
    check(pport < 0 or pport in ports.values(),
          f"Deployment: containerPort {sorted(ports.values())} lacks the probe port {pport}")
    probe_target = pport if pport >= 0 else port

    def probe(kind):
        p = c.get(kind)
        if not check(p and "httpGet" in p, f"Deployment: {kind} with httpGet"):
            return None
        g = p["httpGet"]
        pp = ports.get(g["port"], g["port"]) if isinstance(g["port"], str) else g["port"]
        check(pp == probe_target,
              f"Deployment: {kind} port {g['port']} is not jemd's probe port {probe_target}")
        path = g["path"]
        check(path in routes and "get" in routes[path],
              f"Deployment: {kind} path {path} is not a GET route in openapi.yaml")
        return p

    su, rd, lv = probe("startupProbe"), probe("readinessProbe"), probe("livenessProbe")
    if rd:
        check(rd["httpGet"]["path"] == "/readyz", "readinessProbe must use /readyz")
    if lv:
        check(lv["httpGet"]["path"] == "/healthz", "livenessProbe must use /healthz (in-process only)")
    if su:
        budget = su.get("failureThreshold", 3) * su.get("periodSeconds", 10)
        check(budget >= 60, f"startupProbe allows only {budget} s for the model load (want >= 60)")

    res = c.get("resources") or {}
    req, lim = res.get("requests") or {}, res.get("limits") or {}
    check(set(req) >= {"cpu", "memory"} and req == lim,
          f"Deployment: requests must equal limits for cpu and memory (Guaranteed): {req} vs {lim}")

    psc, sc = pod.get("securityContext") or {}, c.get("securityContext") or {}

    def eff(key):
        return sc.get(key, psc.get(key))
    check(eff("runAsNonRoot") is True, "securityContext.runAsNonRoot: true")
    check(isinstance(eff("runAsUser"), int) and eff("runAsUser") > 0, "securityContext.runAsUser > 0")
    check(sc.get("readOnlyRootFilesystem") is True, "securityContext.readOnlyRootFilesystem: true")
    check(sc.get("allowPrivilegeEscalation") is False, "securityContext.allowPrivilegeEscalation: false")
    check((sc.get("capabilities") or {}).get("drop") == ["ALL"], "securityContext.capabilities.drop: [ALL]")
    check((eff("seccompProfile") or {}).get("type") == "RuntimeDefault", "seccompProfile: RuntimeDefault")
    mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts") or []}
    vols = {v["name"]: v for v in pod.get("volumes") or []}
    check("/tmp" in mounts and "emptyDir" in vols.get(mounts.get("/tmp"), {}),
          "Deployment: an emptyDir mounted on /tmp (read-only root)")

    pre = ((c.get("lifecycle") or {}).get("preStop") or {})
    if "sleep" in pre:
        pause = int(pre["sleep"]["seconds"])
    else:
        cmd = (pre.get("exec") or {}).get("command") or []
        ok = len(cmd) == 2 and cmd[0].startswith("/") and cmd[0].endswith("/sleep")
        check(ok, f"Deployment: preStop must be a sleep (exec /bin/sleep N or sleep action): {cmd}")
        pause = int(cmd[1]) if ok else 0
    drain = int(flag_value(args, "--drain-seconds") or env.get("JEMD_DRAIN_SECONDS")
                or help_.envs.get("JEMD_DRAIN_SECONDS", "30"))
    delay = int(flag_value(args, "--drain-delay") or env.get("JEMD_DRAIN_DELAY")
                or help_.envs.get("JEMD_DRAIN_DELAY", "0"))
    grace = pod.get("terminationGracePeriodSeconds", 30)
    check(pause > 0, "Deployment: preStop pause > 0")
    check(grace >= pause + delay + drain,
          f"terminationGracePeriodSeconds {grace} < preStop {pause} + drain delay {delay} + drain {drain}")
    print(f"  probes {su and su['httpGet']['path']}/{rd and rd['httpGet']['path']}/"
          f"{lv and lv['httpGet']['path']} on port {port}; grace {grace} >= {pause}+{delay}+{drain}")

    # jobs live in Redis: the jemd Service needs no affinity, the Deployment
    # points --job-store at the Redis StatefulSet's Service
    svcs = {d["metadata"]["name"]: d for _, d in docs.get("Service", [])}
    store = next((e.get("value", "") for e in c.get("env") or [] if e["name"] == "JEMD_JOB_STORE"), "")
    m = re.match(r"redis://(?:[^@]*@)?([^:/]+):(\d+)", store)
    check(m and m.group(1) in svcs, f"Deployment: JEMD_JOB_STORE {store!r} names a Redis Service")
    if m and m.group(1) in svcs:
        rs = svcs[m.group(1)]["spec"]
        sts = [d for _, d in docs.get("StatefulSet", [])]
        check(sts and all(sts[0]["spec"]["template"]["metadata"]["labels"].get(k) == v
                          for k, v in rs["selector"].items()),
              "the Redis Service selects the StatefulSet's pod")
        check(any(int(p["port"]) == int(m.group(2)) for p in rs["ports"]),
              "the Redis Service serves the URL's port")
    jemd_svcs = [d for d in svcs.values()
                 if all(labels.get(k) == v for k, v in d["spec"]["selector"].items())]
    check(len(jemd_svcs) == 1, "one Service selects the jemd pods")
    if jemd_svcs:
        s = jemd_svcs[0]["spec"]
        check(s.get("sessionAffinity", "None") == "None",
              "Service: no sessionAffinity (jobs are shared through Redis)")
        for p in s["ports"]:
            t = p.get("targetPort", p["port"])
            t = ports.get(t) if isinstance(t, str) else t
            check(t == port, f"Service targetPort {p.get('targetPort')} is not jemd's port {port}")
    if docs.get("HorizontalPodAutoscaler"):
        _, hpa = docs["HorizontalPodAutoscaler"][0]
        check(hpa["apiVersion"] == "autoscaling/v2", "HPA: autoscaling/v2")
        ref = hpa["spec"]["scaleTargetRef"]
        check(ref["kind"] == "Deployment" and ref["name"] == name, "HPA targets the Deployment")
        check(any(m.get("type") == "Resource" and m["resource"]["name"] == "cpu"
                  for m in hpa["spec"].get("metrics", [])), "HPA scales on CPU")
        check(hpa["spec"].get("minReplicas", 1) >= 2, "HPA: minReplicas >= 2 (the PDB allows one down)")
        check("replicas" not in dep["spec"], "Deployment must not fix `replicas` when an HPA owns it")
    if docs.get("PodDisruptionBudget"):
        _, pdb = docs["PodDisruptionBudget"][0]
        check(pdb["apiVersion"] == "policy/v1", "PDB: policy/v1")
        ml = pdb["spec"]["selector"]["matchLabels"]
        check(all(labels.get(k) == v for k, v in ml.items()), "PDB selector does not match the pods")
    kust = K8S / "kustomization.yaml"
    if kust.is_file():
        listed = set(yaml.safe_load(kust.read_text()).get("resources", []))
        want = {f.name for f in K8S.glob("*.yaml")} - {"kustomization.yaml"}
        check(listed == want, f"kustomization.yaml resources {sorted(listed)} != {sorted(want)}")
        if shutil.which("kubectl"):
            r = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True,
                               text=True, timeout=60)
            check(r.returncode == 0, f"kubectl kustomize deploy/k8s: {r.stderr.strip()}")


# ---------------------------------------------------------------------------
def dockerfile_instructions(text):
    out, buf = [], ""
    for raw in text.splitlines():
        s = raw.strip()
        if not buf and (not s or s.startswith("#")):
            continue
        if buf and s.startswith("#"):
            continue
        if s.endswith("\\"):
            buf += s[:-1] + " "
            continue
        line = buf + s
        buf = ""
        op, _, rest = line.partition(" ")
        out.append((op.upper(), rest.strip()))
    return out


def test_compose(help_):
    print("== compose file (two replicas and Redis)")
    doc = yaml.safe_load((DEPLOY / "compose" / "compose.yaml").read_text())
    svcs = doc.get("services", {})
    jemds = {n: v for n, v in svcs.items() if "JEMD_JOB_STORE" in (v.get("environment") or {})}
    check(len(jemds) == 2, f"compose: two jemd replicas ({sorted(jemds)})")
    host_ports = set()
    for n, v in jemds.items():
        env = {k: str(x) for k, x in v["environment"].items()}
        check_names(help_, f"compose {n}", [], env)
        m = re.match(r"redis://(?:[^@]*@)?([^:/]+):(\d+)", env["JEMD_JOB_STORE"])
        check(m and m.group(1) in svcs, f"compose {n}: the job store is the Redis service")
        check(env.get("JEMD_HOST") == "0.0.0.0", f"compose {n}: listens on 0.0.0.0")
        host_ports |= {p.rsplit(":", 2)[-2] for p in v.get("ports", [])}
        if help_.real():
            rc, err = help_.accepts([], env)
            check(rc == 0, f"compose {n}: jemd rejects its environment: {err}")
    check(len(host_ports) == 2, f"compose: each replica on its own host port ({host_ports})")


def test_dockerfile(help_, build):
    print("== Dockerfile and ignore file")
    ins = dockerfile_instructions(DOCKERFILE.read_text())
    froms = [i for i, (op, _) in enumerate(ins) if op == "FROM"]
    check(len(froms) >= 2, "Dockerfile: multi-stage (builder + runtime)")
    pre = {a.split("=", 1)[0] for op, a in ins[:froms[0]] if op == "ARG"} if froms else set()
    check({"BASE_IMAGE", "BUILDER_IMAGE"} <= pre, "Dockerfile: ARG BASE_IMAGE and BUILDER_IMAGE before FROM")
    final = ins[froms[-1]:] if froms else ins
    check(final[0][1].split()[0] == "${BASE_IMAGE}", "Dockerfile: the runtime stage is FROM ${BASE_IMAGE}")
    for op, a in ins:
        check(not (op in ("ENV", "ARG") and "OPENBLAS_CORETYPE" in a),
              f"Dockerfile must not force OPENBLAS_CORETYPE ({op} {a})")
    ops = {}
    for op, a in final:
        ops.setdefault(op, []).append(a)
    user = (ops.get("USER") or [""])[-1]
    check(re.fullmatch(r"[1-9][0-9]*(:[0-9]+)?", user) is not None, f"Dockerfile: USER must be numeric non-root, got '{user}'")

    def exec_form(op):
        v = (ops.get(op) or [None])[-1]
        try:
            arr = json.loads(v) if v else None
        except ValueError:
            arr = None
        check(isinstance(arr, list) and all(isinstance(x, str) for x in arr),
              f"Dockerfile: {op} must be exec form (a JSON array): {v}")
        return arr or []
    entry, cmd = exec_form("ENTRYPOINT"), exec_form("CMD")
    check(entry[:1] == ["/usr/bin/jemd"], f"Dockerfile: ENTRYPOINT runs /usr/bin/jemd: {entry}")
    args = entry[1:] + cmd
    env = {}
    for a in ops.get("ENV", []):
        for item in shlex.split(a):
            k, _, v = item.partition("=")
            env[k] = v
    check_names(help_, "Dockerfile", flags_in(args), env)
    check(env.get("JEMD_HOST") == "0.0.0.0" and flag_value(args, "--host") is None,
          "Dockerfile: ENV JEMD_HOST=0.0.0.0 and no --host flag (run arguments replace CMD, "
          "and a flag would beat -e JEMD_HOST)")
    hc = (ops.get("HEALTHCHECK") or [""])[-1]
    m = re.search(r"\bCMD\s+(\[.*\])\s*$", hc)
    check(m is not None, f"Dockerfile: HEALTHCHECK CMD [...] (exec form): '{hc}'")
    if m:
        hcmd = json.loads(m.group(1))
        check(hcmd[0] == "/usr/bin/jemd-healthcheck", "HEALTHCHECK uses the image's jemd-healthcheck (no curl)")
    check(any("healthcheck.c" in a for op, a in ins if op == "RUN"), "Dockerfile builds deploy/container/healthcheck.c")
    port = int(env.get("JEMD_PORT") or flag_value(args, "--port") or 8080)
    pport = int(env.get("JEMD_PROBE_PORT") or flag_value(args, "--probe-port") or -1)
    want = [str(port)] + ([str(pport)] if pport >= 0 else [])
    exposed = [p.split("/")[0] for a in ops.get("EXPOSE", []) for p in a.split()]
    check(want == exposed, f"Dockerfile: EXPOSE {' '.join(want)} (got {exposed})")
    check(any("fmnist-jem.safetensors" in a for op, a in ins if op in ("COPY", "RUN")),
          "Dockerfile bakes in the default model")
    if help_.real():
        rc, err = help_.accepts(args, env)
        check(rc == 0, f"jemd rejects the image's CMD/ENV: {err}")
    runtime_apt = " ".join(a for op, a in final if op == "RUN")
    check("-dev" not in runtime_apt, "runtime stage installs no -dev packages")

    # Each library jemd links against comes from a package the runtime installs.
    jemd = build / "jemd"
    if shutil.which("ldd") and shutil.which("dpkg"):
        # Direct dependencies only (readelf NEEDED); apt pulls in the rest.
        rd = subprocess.run(["readelf", "-d", str(jemd)], capture_output=True, text=True)
        needed = set(re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", rd.stdout))
        check(bool(needed), f"readelf -d {jemd}: no NEEDED entries ({rd.stderr.strip()})")
        r = subprocess.run(["ldd", str(jemd)], capture_output=True, text=True)
        base = {"libc6", "libgcc-s1"}
        for m2 in re.finditer(r"(?m)^\s*(\S+)\s+=>\s+(/\S+)", r.stdout):
            if m2.group(1) not in needed:
                continue
            real = os.path.realpath(m2.group(2))
            d = subprocess.run(["dpkg", "-S", real], capture_output=True, text=True)
            pkg = d.stdout.split(":")[0] if d.returncode == 0 else None
            if pkg and pkg not in base and "asan" not in pkg and "ubsan" not in pkg:
                check(re.search(r"\b%s\b" % re.escape(pkg), runtime_apt) is not None,
                      f"runtime stage lacks {pkg} (for {m2.group(1)})")
        print(f"  jemd needs {sorted(needed)}; each one's package is installed in the runtime stage")

    ign = IGNOREFILE.read_text().split()
    check("*" in ign and "!models/fmnist-jem.safetensors" in ign,
          "ignore file: exclude everything, then re-include sources and the model")
    check(f"--ignorefile \"$HERE/{IGNOREFILE.name}\"" in BUILD_SH.read_text(),
          "build.sh passes the ignore file to podman build")
    check("--isolation chroot --format docker" in BUILD_SH.read_text(),
          "build.sh: podman build --isolation chroot --format docker")
    for script in (BUILD_SH, DEPLOY / "systemd" / "nspawn-check.sh"):
        r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        check(r.returncode == 0, f"{script.name}: bash -n: {r.stderr.strip()}")


# ---------------------------------------------------------------------------
def test_daemon(build, routes):
    """The probe paths answer on a real daemon, the health checker reads them
    right, and READY=1/STOPPING=1 reach $NOTIFY_SOCKET (Type=notify)."""
    print("== daemon: probe routes, healthcheck binary, sd_notify")
    sys.path.insert(0, str(HERE))
    import jemtest  # noqa: E402 (the shared integration helpers)
    with tempfile.TemporaryDirectory(prefix="jemd-deploy-") as tmp:
        hcbin = Path(tmp) / "jemd-healthcheck"
        r = subprocess.run(["cc", "-std=c11", "-D_POSIX_C_SOURCE=200809L", "-D_DEFAULT_SOURCE",
                            "-O2", "-Wall", "-Wextra", "-Werror", "-Wshadow", "-Wstrict-prototypes",
                            "-Wmissing-prototypes", "-Wvla", "-Wformat=2", "-o", str(hcbin),
                            str(HEALTHCHECK_C)], capture_output=True, text=True)
        check(r.returncode == 0, f"healthcheck.c does not compile cleanly: {r.stderr.strip()}")
        model = os.path.join(tmp, "m.safetensors")
        jemtest.write_model(model)
        nsock = os.path.join(tmp, "notify")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        s.bind(nsock)
        s.settimeout(10)
        d = jemtest.Daemon(str(build / "jemd"), model, "--probe-port", "0",
                           env={"NOTIFY_SOCKET": nsock})
        pport = next((int(m.group(1)) for m in (re.match(r"jemd: probes on http://\S+:(\d+)", ln)
                                                 for ln in d.lines) if m), None)
        try:
            msgs = []
            try:
                while not any("READY=1" in m for m in msgs):
                    msgs.append(s.recv(4096).decode())
            except socket.timeout:
                pass
            check(any("READY=1" in m for m in msgs), f"jemd sent no READY=1 to $NOTIFY_SOCKET: {msgs}")
            for path in ("/healthz", "/readyz", "/metrics"):
                st, _, _ = d.request("GET", path)
                check(st == 200, f"GET {path} -> {st} on a running daemon")
                check(path in routes, f"{path} is not in openapi.yaml")
                out = d.raw(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path.encode(), port=pport)
                check(out.startswith(b"HTTP/1.1 200"), f"GET {path} on the probe port: {out[:20]!r}")
            if r.returncode == 0:
                def hc(*a, env=None):
                    return subprocess.run([str(hcbin), *a], env=env or {}, capture_output=True,
                                          text=True, timeout=10).returncode
                check(hc(env={"JEMD_PORT": str(d.port)}) == 0, "jemd-healthcheck ($JEMD_PORT) fails on a healthy daemon")
                check(hc(env={"JEMD_PORT": "1", "JEMD_PROBE_PORT": str(pport)}) == 0,
                      "jemd-healthcheck does not use $JEMD_PROBE_PORT")
                check(hc(f"http://127.0.0.1:{d.port}/readyz") == 0, "jemd-healthcheck /readyz fails")
                check(hc(f"http://127.0.0.1:{d.port}/no-such-route") == 1,
                      "jemd-healthcheck passes on a 404")
                free = socket.socket()
                free.bind(("127.0.0.1", 0))
                fport = free.getsockname()[1]
                free.close()
                check(hc(f"http://127.0.0.1:{fport}/healthz") == 1, "jemd-healthcheck passes with nothing listening")
                check(hc("http://localhost:8080/healthz") == 1, "jemd-healthcheck accepts a host name")
            d.signal(signal.SIGTERM)
            rc = d.wait(60)
            check(rc == 0, f"jemd exited {rc} on SIGTERM (want 0 after draining)")
            try:
                while not any("STOPPING=1" in m for m in msgs):
                    msgs.append(s.recv(4096).decode())
            except socket.timeout:
                pass
            check(any("STOPPING=1" in m for m in msgs), f"jemd sent no STOPPING=1 on SIGTERM: {msgs}")
        finally:
            d.kill()
            s.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build", default="build", help="directory holding jemd (default: build)")
    a = ap.parse_args()
    build = Path(a.build)
    if not build.is_absolute():
        build = (Path.cwd() / build).resolve()
    help_ = Help(build / "jemd")
    print("== jemd --help")
    check(help_.real(), f"{build}/jemd --help is not the daemon's real help (rc {help_.rc}); "
          "flag and variable checks cannot pass")
    print(f"  {len(help_.flags)} flags, {len(help_.envs)} JEMD_* variables")
    spec, routes = openapi_paths()
    check(spec is not None and routes, "openapi.yaml (repository root or server/) with paths")
    print(f"  openapi: {spec} ({len(routes)} paths)")

    readme = (DEPLOY / "README.md").read_text()
    table_flags = re.findall(r"`(--[a-z0-9-]+)`", "\n".join(
        l for l in readme.splitlines() if l.startswith("| `--")))
    check(len(table_flags) >= 5, "deploy/README.md: configuration table of flags")
    check_names(help_, "deploy/README.md", table_flags, set(re.findall(r"\bJEMD_[A-Z0-9_]+", readme)))

    test_unit_text(help_)
    test_k8s(help_, routes)
    test_compose(help_)
    test_dockerfile(help_, build)
    test_install_and_systemd(build)
    if help_.real():
        test_daemon(build, routes)
    if failures:
        print(f"test_deploy: {len(failures)} failure(s)")
        return 1
    print("test_deploy: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())

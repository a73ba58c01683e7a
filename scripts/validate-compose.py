#!/usr/bin/env python3
"""Static checks of docker-compose.yml, deploy/relay.toml, the Dockerfile and
.dockerignore, and of the monitoring profile (deploy/prometheus/, deploy/grafana/),
without Docker (for CI).

    python3 scripts/validate-compose.py [path/to/outbox-relay]

The relay binary (default target/debug/outbox-relay; build it with `cargo build`)
is the authority on config keys: its loader rejects unknown keys in the file and
unknown OUTBOX_RELAY_* variables before doing any I/O. So for every service that
runs the relay image, this script runs

    outbox-relay --config <the host file mounted at OUTBOX_RELAY_CONFIG> status --json

with that service's OUTBOX_RELAY_* variables, and fails on a config error. The
servers named in the URLs are not reachable here: `status` then reports
connection errors (or is stopped after 10 s), which is fine, since config errors
end the process before any connection is tried.

The services of the `monitoring` profile (prometheus, grafana) are checked
statically: the profile is set, the images pin a major version, the files they
mount exist, Prometheus scrapes the relay service on its HTTP port under the job
name the alert rules use and loads deploy/prometheus/alerts.yml (identical to the
rules in docs/operations.md), Grafana provisions the datasource the dashboard's
panels name and loads the dashboard from where it is mounted, and every
outbox_relay_* name in the dashboard and the rules is a metric src/metrics.rs
registers. promtool checks the Prometheus files themselves (scripts/test.sh).

Exit status 0 when every check passes; 1 with one line per problem otherwise.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

REQUIRED_SERVICES = ["postgres", "nats", "migrate", "relay", "producer"]
RELAY_COMMANDS = {"run", "migrate", "check", "status"}
DEPENDS_CONDITIONS = {
    "service_started",
    "service_healthy",
    "service_completed_successfully",
}
# Printed by the relay when the config (file or environment) is rejected.
CONFIG_ERROR_MARKERS = [
    "error: config",
    "unknown config key",
    "no such config section",
    "cannot read config file",
    "environment variable OUTBOX_RELAY_",
]
STATUS_TIMEOUT_S = 10

# The monitoring profile (docker compose --profile monitoring up).
MONITORING_PROFILE = "monitoring"
MONITORING_IMAGES = {"prometheus": "prom/prometheus", "grafana": "grafana/grafana"}
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "outbox-relay.json"
OPERATIONS = ROOT / "docs" / "operations.md"
METRICS_RS = ROOT / "src" / "metrics.rs"
GRAFANA_PROVISIONING = "/etc/grafana/provisioning"
PROMETHEUS_DEFAULT_PORT = "9090"

problems: list[str] = []
passed: list[str] = []


def problem(msg: str) -> None:
    problems.append(msg)
    print(f"FAIL  {msg}")


def ok(msg: str) -> None:
    passed.append(msg)
    print(f"ok    {msg}")


def load_yaml_module():
    try:
        import yaml  # noqa: PLC0415

        return yaml
    except ImportError:
        pass
    print("PyYAML missing: python3 -m pip install --quiet pyyaml", flush=True)
    attempts = [
        [sys.executable, "-m", "pip", "install", "--quiet", "pyyaml"],
        [sys.executable, "-m", "pip", "install", "--quiet", "--user", "pyyaml"],
        # PEP 668 ("externally managed") systems: a private directory instead.
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--target",
            str(ROOT / ".tools" / "python"),
            "pyyaml",
        ],
    ]
    for cmd in attempts:
        if subprocess.run(cmd, check=False).returncode == 0:
            break
    sys.path.insert(0, str(ROOT / ".tools" / "python"))
    import site  # noqa: PLC0415

    sys.path.insert(0, site.getusersitepackages())
    try:
        import yaml  # noqa: PLC0415

        return yaml
    except ImportError:
        sys.exit("error: PyYAML is not installed and could not be installed with pip")


# --- compose interpolation ------------------------------------------------------------

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def interpolate(value, env: dict[str, str], where: str):
    """Compose's variable substitution: ${VAR}, ${VAR:-default}, ${VAR-default},
    ${VAR:?err}, $VAR and $$."""
    if isinstance(value, dict):
        return {k: interpolate(v, env, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env, f"{where}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        op, arg = m.group(2), m.group(3) or ""
        have = env.get(name)
        if op == ":-":
            return have if have else arg
        if op == "-":
            return have if have is not None else arg
        if op in (":?", "?"):
            if not have:
                problem(f"{where}: ${{{name}}} is required ({arg})")
            return have or ""
        if have is None:
            problem(f"{where}: ${name} is not set and has no default (use ${{{name}:-default}})")
            return ""
        return have

    return _VAR.sub(sub, value)


def env_of(service: dict, where: str) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        out = {}
        for item in env:
            key, _, val = str(item).partition("=")
            out[key] = val
        return out
    if isinstance(env, dict):
        return {str(k): "" if v is None else str(v) for k, v in env.items()}
    problem(f"{where}.environment must be a mapping or a list")
    return {}


def command_of(service: dict) -> list[str]:
    cmd = service.get("command")
    if cmd is None:
        return []
    if isinstance(cmd, str):
        return cmd.split()
    return [str(c) for c in cmd]


def depends_of(service: dict) -> dict[str, str]:
    dep = service.get("depends_on") or {}
    if isinstance(dep, list):
        return {str(d): "service_started" for d in dep}
    return {
        str(k): (v or {}).get("condition", "service_started") if isinstance(v, dict) else "service_started"
        for k, v in dep.items()
    }


def mounts_of(service: dict) -> list[tuple[str, str]]:
    """(source, target) of each short- or long-syntax volume."""
    out = []
    for v in service.get("volumes") or []:
        if isinstance(v, str):
            parts = v.split(":")
            if len(parts) >= 2:
                out.append((parts[0], parts[1]))
            else:
                out.append(("", parts[0]))
        elif isinstance(v, dict):
            out.append((str(v.get("source", "")), str(v.get("target", ""))))
    return out


def is_bind(source: str) -> bool:
    return source.startswith((".", "/", "~"))


def host_path(source: str) -> Path:
    p = Path(os.path.expanduser(source))
    return p if p.is_absolute() else (COMPOSE.parent / p).resolve()


# --- compose structure ------------------------------------------------------------------


def check_compose(yaml) -> dict:
    if not COMPOSE.is_file():
        problem(f"{COMPOSE.name} not found")
        return {}
    try:
        raw = yaml.safe_load(COMPOSE.read_text())
    except yaml.YAMLError as e:
        problem(f"{COMPOSE.name} is not valid YAML: {e}")
        return {}
    if not isinstance(raw, dict) or not isinstance(raw.get("services"), dict) or not raw["services"]:
        problem(f"{COMPOSE.name}: no services mapping")
        return {}
    before = len(problems)
    doc = interpolate(raw, dict(os.environ), "compose")
    services: dict = doc["services"]
    declared_volumes = set((doc.get("volumes") or {}).keys())

    for name in REQUIRED_SERVICES:
        if name not in services:
            problem(f"service {name!r} missing")
    ok(f"services: {', '.join(services)}")

    for name, svc in services.items():
        where = f"services.{name}"
        if not isinstance(svc, dict):
            problem(f"{where} is not a mapping")
            continue
        if "image" not in svc and "build" not in svc:
            problem(f"{where}: neither image nor build")
        build = svc.get("build")
        if build is not None:
            context = build if isinstance(build, str) else build.get("context", ".")
            dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
            ctx = host_path(context)
            if not (ctx / dockerfile).is_file():
                problem(f"{where}.build: {ctx / dockerfile} does not exist")
        for dep, cond in depends_of(svc).items():
            if dep not in services:
                problem(f"{where}.depends_on: no service {dep!r}")
                continue
            if cond not in DEPENDS_CONDITIONS:
                problem(f"{where}.depends_on.{dep}: unknown condition {cond!r}")
            if cond == "service_healthy" and "healthcheck" not in services[dep]:
                problem(f"{where}.depends_on.{dep}: service_healthy but {dep} has no healthcheck")
            if cond == "service_completed_successfully" and services[dep].get("restart") in ("always", "unless-stopped"):
                problem(f"{where}.depends_on.{dep}: waits for {dep} to complete, but {dep} restarts")
        for source, target in mounts_of(svc):
            if not target.startswith("/"):
                problem(f"{where}.volumes: target {target!r} is not an absolute path")
            if not source:
                continue
            if is_bind(source):
                if not host_path(source).exists():
                    problem(f"{where}.volumes: bind source {source} does not exist")
            elif source not in declared_volumes:
                problem(f"{where}.volumes: named volume {source!r} not declared under top-level volumes")
        for port in svc.get("ports") or []:
            text = str(port) if not isinstance(port, dict) else str(port.get("target", ""))
            if not re.fullmatch(r"(?:[\d.]+:)?(?:\d+:)?\d+(?:/(?:tcp|udp))?", text):
                problem(f"{where}.ports: cannot read {port!r}")
        hc = svc.get("healthcheck")
        if hc is not None and not hc.get("test"):
            problem(f"{where}.healthcheck has no test")

    check_cycles(services)

    pg = services.get("postgres", {})
    pg_cmd = " ".join(command_of(pg))
    if "wal_level=logical" not in pg_cmd:
        problem("services.postgres.command must set wal_level=logical")
    else:
        ok("postgres runs with wal_level=logical")
    if not (pg.get("environment") and ("POSTGRES_PASSWORD" in env_of(pg, "services.postgres"))):
        problem("services.postgres.environment must set POSTGRES_PASSWORD (the image refuses to start without it)")
    nats_cmd = command_of(services.get("nats", {}))
    if not {"-js", "--jetstream"} & set(nats_cmd):
        problem("services.nats.command must enable JetStream (-js)")
    else:
        ok("nats runs with JetStream")

    for name, want in (("relay", ["run"]), ("migrate", ["migrate"])):
        svc = services.get(name, {})
        if command_of(svc) != want:
            problem(f"services.{name}.command must be {json.dumps(want)}, is {json.dumps(command_of(svc))}")
    relay = services.get("relay", {})
    deps = depends_of(relay)
    if deps.get("migrate") != "service_completed_successfully":
        problem("services.relay must depend on migrate with condition service_completed_successfully")
    if "nats" not in deps:
        problem("services.relay must depend on nats")
    if depends_of(services.get("migrate", {})).get("postgres") != "service_healthy":
        problem("services.migrate must depend on postgres with condition service_healthy")
    listen = env_of(relay, "services.relay").get("OUTBOX_RELAY_HTTP_LISTEN")
    if listen:
        port = listen.rsplit(":", 1)[-1]
        published = [str(p).rsplit(":", 1)[-1].split("/")[0] for p in relay.get("ports") or []]
        if port not in published:
            problem(f"services.relay: http listens on {port} but ports publish {published}")
        if listen.startswith("127."):
            problem("services.relay: OUTBOX_RELAY_HTTP_LISTEN on 127.x is unreachable from outside the container")

    # Files a service's command reads from a bind-mounted directory must exist.
    for name, svc in services.items():
        text = " ".join(command_of(svc)) + " " + " ".join(str(e) for e in (svc.get("entrypoint") or []))
        for source, target in mounts_of(svc):
            if not is_bind(source) or not host_path(source).is_dir():
                continue
            for ref in re.findall(re.escape(target.rstrip("/")) + r"/[\w./-]+", text):
                rel = ref[len(target.rstrip("/")) + 1 :]
                if not (host_path(source) / rel).exists():
                    problem(f"services.{name}: {ref} is not in {source}")
    if len(problems) == before:
        ok("compose structure: images/builds, depends_on, volumes, ports, commands")
    return services


def check_cycles(services: dict) -> None:
    state: dict[str, int] = {}

    def visit(n: str, path: list[str]) -> None:
        if state.get(n) == 1:
            problem(f"depends_on cycle: {' -> '.join(path + [n])}")
            return
        if state.get(n) == 2 or n not in services:
            return
        state[n] = 1
        for d in depends_of(services[n]):
            visit(d, path + [n])
        state[n] = 2

    for n in services:
        visit(n, [])


# --- relay config, judged by the relay ---------------------------------------------------


def relay_services(services: dict) -> dict:
    relay_image = services.get("relay", {}).get("image")
    out = {}
    for name, svc in services.items():
        cmd = command_of(svc)
        same_image = relay_image is not None and svc.get("image") == relay_image
        if (svc.get("build") is not None or same_image) and cmd[:1] and cmd[0] in RELAY_COMMANDS:
            out[name] = svc
    return out


def run_relay(binary: Path, config: Path | None, env_vars: dict[str, str]) -> tuple[bool, str]:
    """(config accepted, output)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_RELAY_") and k != "RUST_LOG"}
    env.update(env_vars)
    env["NO_COLOR"] = "1"
    args = [str(binary)]
    if config is not None:
        args += ["--config", str(config)]
    args += ["status", "--json"]
    try:
        out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=STATUS_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as e:
        text = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        text += (e.stderr or b"").decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        # Config errors end the process at once: still running means it was accepted.
        return not any(m in text for m in CONFIG_ERROR_MARKERS), text
    text = out.stdout + out.stderr
    return not any(m in text for m in CONFIG_ERROR_MARKERS), text


def first_error(text: str) -> str:
    for line in text.splitlines():
        if any(m in line for m in CONFIG_ERROR_MARKERS):
            return line.strip()
    return text.strip().splitlines()[-1] if text.strip() else "(no output)"


def check_relay_config(services: dict, binary: Path) -> None:
    if not binary.is_file():
        problem(f"relay binary {binary} not found: run `cargo build` first or pass its path as the first argument")
        return
    # The check must be able to fail: an unknown variable has to be refused.
    accepted, text = run_relay(binary, None, {"OUTBOX_RELAY_NATS_URLL": "nats://x:4222"})
    if accepted:
        problem(f"{binary} accepted the unknown variable OUTBOX_RELAY_NATS_URLL: cannot validate config with it")
        return
    ok(f"{binary.name} refuses unknown keys ({first_error(text)})")

    checked_files: set[Path] = set()
    targets = relay_services(services)
    if not targets:
        problem("no service runs the relay image with a relay command")
    for name, svc in targets.items():
        where = f"services.{name}"
        env = env_of(svc, where)
        relay_env = {k: v for k, v in env.items() if k.startswith("OUTBOX_RELAY_")}
        config_path = None
        in_container = relay_env.pop("OUTBOX_RELAY_CONFIG", None)
        if in_container:
            for source, target in mounts_of(svc):
                if target == in_container and is_bind(source):
                    config_path = host_path(source)
            if config_path is None:
                problem(f"{where}: OUTBOX_RELAY_CONFIG={in_container} but no bind mount provides that file")
                continue
            if not config_path.is_file():
                problem(f"{where}: config file {config_path} does not exist")
                continue
        # The file alone, then with the service's variables.
        if config_path is not None and config_path not in checked_files:
            checked_files.add(config_path)
            accepted, text = run_relay(binary, config_path, {})
            if accepted:
                ok(f"{config_path.relative_to(ROOT)} accepted by the relay")
            else:
                problem(f"{config_path.relative_to(ROOT)} rejected: {first_error(text)}")
        accepted, text = run_relay(binary, config_path, relay_env)
        shown = ", ".join(sorted(relay_env)) or "no OUTBOX_RELAY_* variables"
        if accepted:
            ok(f"{where}: config accepted with {shown}")
        else:
            problem(f"{where}: config rejected: {first_error(text)}")


# --- monitoring profile: Prometheus and Grafana ------------------------------------------


def rel(path: Path) -> str:
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


def bind_source_of(svc: dict, container_path: str) -> Path | None:
    """The host path a bind mount of `svc` provides at `container_path` (the mount
    itself, or a file inside a mounted directory); None when no bind mount does."""
    for source, target in mounts_of(svc):
        if not is_bind(source):
            continue
        target = target.rstrip("/") or "/"
        if container_path == target:
            return host_path(source)
        if container_path.startswith(target + "/"):
            return host_path(source) / container_path[len(target) + 1 :]
    return None


def load_yaml_file(yaml, path: Path, what: str):
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        problem(f"{what}: cannot read {path}: {e}")
        return None


def flag_value(cmd: list[str], flag: str) -> str | None:
    for i, arg in enumerate(cmd):
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
        if arg == flag and i + 1 < len(cmd):
            return cmd[i + 1]
    return None


def runbook_rules() -> str | None:
    """The YAML block of the section "Alert rules" in docs/operations.md."""
    if not OPERATIONS.is_file():
        return None
    text = OPERATIONS.read_text()
    section = text.split("\n## Alert rules\n", 1)
    if len(section) < 2:
        return None
    m = re.search(r"```yaml\n(.*?)```", section[1].split("\n## ", 1)[0], re.S)
    return m.group(1) if m else None


def registered_metrics() -> set[str]:
    """Every exported series name: the names src/metrics.rs registers, with the
    registry's prefix and the suffixes of counters and histograms."""
    text = METRICS_RS.read_text() if METRICS_RS.is_file() else ""
    prefix = re.search(r'Registry::with_prefix\("(\w+)"\)', text)
    names = re.findall(r'register\(\s*"(\w+)"', text)
    if not prefix or not names:
        problem(f"{rel(METRICS_RS)}: cannot find the registered metrics")
        return set()
    out = set()
    for n in names:
        base = f"{prefix.group(1)}_{n}"
        out |= {base, f"{base}_total", f"{base}_bucket", f"{base}_sum", f"{base}_count"}
    return out


def check_metric_names(text: str, where: str, known: set[str]) -> None:
    if not known:
        return
    unknown = sorted({m for m in re.findall(r"\boutbox_relay_\w+", text) if m not in known})
    if unknown:
        problem(f"{where}: no such metric: {', '.join(unknown)} (src/metrics.rs registers the names)")


def check_monitoring(services: dict, yaml) -> None:
    before = len(problems)
    known = registered_metrics()

    for name, repo in MONITORING_IMAGES.items():
        svc = services.get(name)
        if not isinstance(svc, dict):
            problem(f"service {name!r} missing (monitoring profile)")
            continue
        profiles = svc.get("profiles") or []
        if MONITORING_PROFILE not in profiles:
            problem(f"services.{name}: profiles must include {MONITORING_PROFILE!r}, is {profiles!r}")
        image = str(svc.get("image", ""))
        image_repo, _, tag = image.rpartition(":") if ":" in image else (image, "", "")
        if image_repo != repo:
            problem(f"services.{name}.image must be {repo}:<version>, is {image!r}")
        elif not re.fullmatch(r"v?\d+(?:\.\d+)*", tag):
            problem(f"services.{name}.image {image!r} does not pin a major version")
    for name, svc in services.items():
        if not isinstance(svc, dict) or MONITORING_PROFILE in (svc.get("profiles") or []):
            continue
        for dep in depends_of(svc):
            if MONITORING_PROFILE in ((services.get(dep) or {}).get("profiles") or []):
                problem(f"services.{name} (no profile) depends on {dep} (profile {MONITORING_PROFILE}): plain `up` would fail")

    # The rule file is the runbook's, byte for byte.
    rules_doc = runbook_rules()
    if rules_doc is None:
        problem(f"{rel(OPERATIONS)}: no ```yaml block in the section \"Alert rules\"")
    elif not ALERTS.is_file():
        problem(f"{rel(ALERTS)} missing")
    elif ALERTS.read_text() != rules_doc:
        file_lines, doc_lines = ALERTS.read_text().splitlines(), rules_doc.splitlines()
        at = next(
            (i for i, (a, b) in enumerate(zip(file_lines, doc_lines)) if a != b),
            min(len(file_lines), len(doc_lines)),
        )
        problem(
            f"{rel(ALERTS)} differs from the rules in {rel(OPERATIONS)} "
            f"(\"Alert rules\") at line {at + 1}: keep them identical"
        )
    else:
        ok(f"{rel(ALERTS)} is identical to the rules in {rel(OPERATIONS)}")
    if OPERATIONS.is_file() and "deploy/prometheus/alerts.yml" not in OPERATIONS.read_text():
        problem(f"{rel(OPERATIONS)} does not name deploy/prometheus/alerts.yml")
    alert_jobs: set[str] = set()
    if ALERTS.is_file():
        check_metric_names(ALERTS.read_text(), str(rel(ALERTS)), known)
        alert_jobs = set(re.findall(r'\bjob="([^"]+)"', ALERTS.read_text()))

    check_prometheus(services, yaml, alert_jobs)
    check_grafana(services, yaml, known)
    if len(problems) == before:
        ok(
            f"monitoring profile: prometheus ({services['prometheus']['image']}) scrapes the relay with "
            f"{rel(ALERTS)}, grafana ({services['grafana']['image']}) provisions "
            f"{rel(DASHBOARD)}"
        )


def check_prometheus(services: dict, yaml, alert_jobs: set[str]) -> None:
    svc = services.get("prometheus")
    if not isinstance(svc, dict):
        return
    where = "services.prometheus"
    config_in = flag_value(command_of(svc), "--config.file") or "/etc/prometheus/prometheus.yml"
    config = bind_source_of(svc, config_in)
    if config is None or not config.is_file():
        problem(f"{where}: no bind mount provides an existing file at {config_in} (--config.file)")
        return
    doc = load_yaml_file(yaml, config, where)
    if not isinstance(doc, dict):
        problem(f"{where}: {config} is not a mapping")
        return
    # Rule files: relative to the config file's directory, in the container.
    rule_hosts = []
    for rf in doc.get("rule_files") or []:
        in_container = rf if rf.startswith("/") else posixpath.join(posixpath.dirname(config_in), rf)
        source = bind_source_of(svc, in_container)
        if source is None or not source.is_file():
            problem(f"{where}: rule file {in_container} is not mounted from an existing file")
        else:
            rule_hosts.append(source.resolve())
    if ALERTS.resolve() not in rule_hosts:
        problem(f"{where}: {config.name} does not load {rel(ALERTS)} (rule_files)")

    relay = services.get("relay", {})
    listen = env_of(relay, "services.relay").get("OUTBOX_RELAY_HTTP_LISTEN", "")
    relay_port = listen.rsplit(":", 1)[-1] if listen else ""
    if not relay_port:
        problem("services.relay: OUTBOX_RELAY_HTTP_LISTEN is not set: the scrape port is unknown")
        return
    wanted = f"relay:{relay_port}"
    jobs = [j for j in doc.get("scrape_configs") or [] if isinstance(j, dict)]
    scraping = [
        j
        for j in jobs
        for sc in j.get("static_configs") or []
        if wanted in [str(t) for t in (sc or {}).get("targets") or []]
    ]
    if not scraping:
        targets = [str(t) for j in jobs for sc in j.get("static_configs") or [] for t in (sc or {}).get("targets") or []]
        problem(f"{where}: {config.name} scrapes {targets}, not the relay service at {wanted}")
        return
    job = scraping[0].get("job_name")
    path = scraping[0].get("metrics_path", "/metrics")
    if path != "/metrics":
        problem(f"{where}: job {job} scrapes {path}; the relay serves /metrics")
    if alert_jobs and job not in alert_jobs:
        problem(f"{where}: the relay is scraped as job {job!r}, but the alert rules select job {sorted(alert_jobs)}")
    for host in (t.rsplit(":", 1)[0] for sc in scraping[0].get("static_configs") or [] for t in (sc or {}).get("targets") or []):
        if host not in services:
            problem(f"{where}: scrape target host {host!r} is not a compose service")
    ok(f"prometheus scrapes {wanted} as job {job!r} and loads {rel(ALERTS)}")


def check_grafana(services: dict, yaml, known: set[str]) -> None:
    svc = services.get("grafana")
    if not isinstance(svc, dict):
        return
    where = "services.grafana"
    provisioned: list[tuple[str, Path]] = [
        (target, host_path(source))
        for source, target in mounts_of(svc)
        if is_bind(source) and target.startswith(GRAFANA_PROVISIONING + "/")
    ]
    prom = services.get("prometheus", {})
    prom_listen = flag_value(command_of(prom), "--web.listen-address") or f":{PROMETHEUS_DEFAULT_PORT}"
    prom_url = f"http://prometheus:{prom_listen.rsplit(':', 1)[-1]}"

    uids: set[str] = set()
    dashboard_dirs: list[str] = []
    for target, host in provisioned:
        if not host.is_file():
            continue  # a missing bind source is reported by check_compose
        kind = target[len(GRAFANA_PROVISIONING) + 1 :].split("/", 1)[0]
        doc = load_yaml_file(yaml, host, where) or {}
        if kind == "datasources":
            for ds in doc.get("datasources") or []:
                if ds.get("type") != "prometheus":
                    continue
                uids.add(str(ds.get("uid")))
                if str(ds.get("url", "")).rstrip("/") != prom_url:
                    problem(f"{where}: datasource {ds.get('uid')!r} points at {ds.get('url')!r}, not {prom_url}")
        elif kind == "dashboards":
            for prov in doc.get("providers") or []:
                path = ((prov or {}).get("options") or {}).get("path")
                if path:
                    dashboard_dirs.append(str(path).rstrip("/"))
    if not uids:
        problem(f"{where}: no Prometheus datasource provisioned under {GRAFANA_PROVISIONING}/datasources")
    if not dashboard_dirs:
        problem(f"{where}: no dashboard provider under {GRAFANA_PROVISIONING}/dashboards")

    # The dashboard: mounted where a provider reads, naming a provisioned datasource.
    mounted = [
        target
        for source, target in mounts_of(svc)
        if is_bind(source) and host_path(source).resolve() == DASHBOARD.resolve()
    ]
    if not mounted:
        problem(f"{where}: {rel(DASHBOARD)} is not mounted")
        return
    if not any(t == d or t.startswith(d + "/") for t in mounted for d in dashboard_dirs):
        problem(f"{where}: {rel(DASHBOARD)} is mounted at {mounted}, outside the provider paths {dashboard_dirs}")
    home = env_of(svc, where).get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home and home not in mounted:
        problem(f"{where}: GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH={home} is not where the dashboard is mounted")
    try:
        dash = json.loads(DASHBOARD.read_text())
    except (OSError, json.JSONDecodeError) as e:
        problem(f"{rel(DASHBOARD)}: not valid JSON: {e}")
        return
    exprs = 0

    def walk(panels: list) -> None:
        nonlocal exprs
        for p in panels or []:
            title = p.get("title", "?")
            refs = [p.get("datasource")] + [t.get("datasource") for t in p.get("targets") or []]
            for ref in refs:
                if isinstance(ref, dict) and ref.get("type") == "prometheus" and ref.get("uid") not in uids:
                    problem(f"{rel(DASHBOARD)}: panel {title!r} uses datasource uid {ref.get('uid')!r}, provisioned: {sorted(uids)}")
            for t in p.get("targets") or []:
                if not str(t.get("expr", "")).strip():
                    problem(f"{rel(DASHBOARD)}: panel {title!r} has a target without expr")
                exprs += 1
            walk(p.get("panels") or [])

    walk(dash.get("panels") or [])
    for var in (dash.get("templating") or {}).get("list") or []:
        ref = var.get("datasource")
        if isinstance(ref, dict) and ref.get("type") == "prometheus" and ref.get("uid") not in uids:
            problem(f"{rel(DASHBOARD)}: variable {var.get('name')!r} uses datasource uid {ref.get('uid')!r}")
    if exprs == 0:
        problem(f"{rel(DASHBOARD)}: no panel queries")
    check_metric_names(DASHBOARD.read_text(), str(rel(DASHBOARD)), known)
    ok(f"grafana: datasource {sorted(uids)} -> {prom_url}, dashboard with {exprs} queries loaded from {mounted[0]}")

# --- Dockerfile ------------------------------------------------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    out, buf = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#") and buf:
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def check_dockerfile() -> None:
    if not DOCKERFILE.is_file():
        problem("Dockerfile not found")
        return
    before = len(problems)
    ins = dockerfile_instructions(DOCKERFILE.read_text())
    froms = [rest for word, rest in ins if word == "FROM"]
    if len(froms) < 2:
        problem(f"Dockerfile: expected a multi-stage build, found {len(froms)} FROM")
        return
    stage_names = [m.group(1).lower() for f in froms if (m := re.search(r"\s+AS\s+(\S+)\s*$", f, re.I))]
    if "builder" not in stage_names:
        problem("Dockerfile: no `FROM ... AS builder` stage")
    final = froms[-1]
    if re.search(r"\s+AS\s+builder\s*$", final, re.I):
        problem("Dockerfile: the final stage is the builder")
    final_start = max(i for i, (w, _) in enumerate(ins) if w == "FROM")
    final_ins = ins[final_start:]
    if not any(w == "COPY" and "--from=builder" in r for w, r in final_ins):
        problem("Dockerfile: the final stage copies nothing from the builder")

    def exec_form(word: str):
        vals = [r for w, r in final_ins if w == word]
        if not vals:
            return None
        try:
            return json.loads(vals[-1])
        except json.JSONDecodeError:
            return vals[-1]

    if exec_form("ENTRYPOINT") != ["outbox-relay"]:
        problem(f'Dockerfile: final ENTRYPOINT must be ["outbox-relay"], is {exec_form("ENTRYPOINT")!r}')
    if exec_form("CMD") != ["run"]:
        problem(f'Dockerfile: final CMD must be ["run"], is {exec_form("CMD")!r}')
    if not any(w == "EXPOSE" and "9187" in r.split() for w, r in final_ins):
        problem("Dockerfile: EXPOSE 9187 missing in the final stage")
    users = [r for w, r in final_ins if w == "USER"]
    if not users or users[-1].split(":")[0] in ("root", "0"):
        problem("Dockerfile: the final stage must run as a non-root USER")
    if len(problems) == before:
        ok(f"Dockerfile: stages {', '.join(stage_names) or '?'} + final {final.split()[0]}, ENTRYPOINT/CMD/EXPOSE/USER as expected")

    if not DOCKERIGNORE.is_file():
        problem(".dockerignore not found")
        return
    entries = {line.strip().strip("/") for line in DOCKERIGNORE.read_text().splitlines() if line.strip() and not line.startswith("#")}
    missing = [e for e in ("target", ".tools", ".git", "fuzz/target") if e not in entries]
    if missing:
        problem(f".dockerignore does not exclude {', '.join(missing)}")
    else:
        ok(".dockerignore excludes target, .tools, .git, fuzz/target")


def main() -> int:
    binary = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "target" / "debug" / "outbox-relay"
    if not binary.is_absolute():
        binary = (Path.cwd() / binary).resolve()
    yaml = load_yaml_module()
    services = check_compose(yaml)
    if services:
        check_monitoring(services, yaml)
    check_dockerfile()
    if services:
        check_relay_config(services, binary)
    print()
    if problems:
        print(f"validate-compose: {len(problems)} problem(s):")
        for p in problems:
            print(f"  - {p}")
        return 1
    print(f"validate-compose: all {len(passed)} checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())

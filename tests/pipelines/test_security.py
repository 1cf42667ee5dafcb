"""Security defaults: loopback-only servers, MLflow's host-header and CORS protection on, and no
credentials in the repository.

The MLflow server is started exactly as ``make serve`` starts it (the command and environment
of :mod:`pipelines.ops.servers`), on a free port with a store under tmp.
"""

from __future__ import annotations

import json
import re
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.pipelines.mlflow_server import MlflowServer, free_port, request

ROOT = Path(__file__).resolve().parents[2]
FOREIGN = "evil.example.com"

# Things that look like credentials. A URI password may only be a placeholder (${VAR}, $VAR,
# {name}, <...>); assignments of secret-named keys may not hold a literal.
SECRET_PATTERNS = {
    "AWS access key id": r"\bAKIA[0-9A-Z]{16}\b",
    "private key": r"-----BEGIN (?:RSA |EC |DSA |OPENSSH |ENCRYPTED )?PRIVATE KEY-----",
    "GitHub token": r"\b(?:gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,})",
    "Slack token": r"\bxox[abprs]-[A-Za-z0-9-]{10,}",
    "Google API key": r"\bAIza[0-9A-Za-z_-]{35}\b",
    "API secret key": r"\bsk-[A-Za-z0-9_-]{20,}",
    "password in a URI": r"\b[a-z][a-z0-9+.-]*://[^\s/:@'\"]+:(?!\$?\{|\$\w|<)[^\s/@'\"]+@",
    "secret assigned a literal": (r"(?i)\b\w*(?:password|passwd|secret|api_?key|access_?key|"
                                  r"auth_?token)\w*['\"]?\s*[:=]\s*['\"](?!\$?\{|\$\w|<)"
                                  r"[^'\"\s]{6,}['\"]"),
}


# Deliberate fakes: (file, matched text). Tests that show a credential is refused need one.
KNOWN_FAKES = {
    ("tests/infra/test_dvc_remote.py", "http://user" + ":pw@"),  # a remote URL with credentials
}


def _repo_files() -> list[str]:
    """What git would commit: tracked files plus untracked ones that are not ignored."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [f for f in listed.splitlines() if (ROOT / f).is_file()]


def test_no_credentials_in_the_repository():
    found = []
    for rel in _repo_files():
        try:
            text = (ROOT / rel).read_text()
        except (UnicodeDecodeError, OSError):
            continue  # binary
        for what, pattern in SECRET_PATTERNS.items():
            found += [f"{rel}:{text.count(chr(10), 0, m.start()) + 1}: {what}: {m.group(0)[:40]}"
                      for m in re.finditer(pattern, text) if (rel, m.group(0)) not in KNOWN_FAKES]
    assert found == []


# Assembled at run time, so that this file does not trip its own scan.
FAKE = "hunter" + "22"


@pytest.mark.parametrize("line, what", [
    ("aws_access_key_id = AKIA" + "ABCDEFGHIJKLMNOP", "AWS access key id"),
    (f"uri: postgresql://mlflow:{FAKE}@db:5432/mlflow", "password in a URI"),
    (f'POSTGRES_PASSWORD: "{FAKE}"', "secret assigned a literal"),
    ("-----BEGIN OPENSSH PRIVATE " + "KEY-----", "private key"),
])
def test_the_secret_patterns_catch_credentials(line, what):
    assert re.search(SECRET_PATTERNS[what], line)


@pytest.mark.parametrize("line", [
    "uri: postgresql://mlflow:${POSTGRES_PASSWORD}@db:5432/mlflow",
    "POSTGRES_PASSWORD: ${POSTGRES_PASSWORD}", "http://127.0.0.1:5000/#/models/x",
    "password = os.environ['DB_PASSWORD']",
])
def test_placeholders_are_not_credentials(line):
    assert not any(re.search(p, line) for p in SECRET_PATTERNS.values())


def test_env_files_are_git_ignored():
    names = [".env", "infra/.env", "infra/team/.env"]
    ignored = subprocess.run(["git", "check-ignore", *names], cwd=ROOT, capture_output=True,
                             text=True).stdout.split()
    assert ignored == names
    tracked_env = [f for f in _repo_files() if Path(f).name == ".env"]
    assert tracked_env == []
    for compose in [f for f in _repo_files() if re.search(r"compose[^/]*\.ya?ml$", f)]:
        for env_file in re.findall(r"env_file:\s*\[?\s*['\"]?([^\s'\"\]]+)", (ROOT / compose)
                                   .read_text()):
            path = (Path(compose).parent / env_file).as_posix()
            assert subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode == 0, (
                f"{compose}: env_file {env_file} is not git-ignored")


def test_servers_bind_loopback_by_default(tmp_path):
    from pipelines.ops import servers

    cfg = servers.ServeConfig.from_env(tmp_path, {})
    assert cfg.host == "127.0.0.1"
    for service, argv in servers.commands(cfg, "pool", "worker-1").items():
        if "--host" in argv:
            assert argv[argv.index("--host") + 1] == "127.0.0.1", service
    assert {"prefect", "mlflow"} <= {s for s, a in servers.commands(cfg, "p", "w").items()
                                     if "--host" in a}
    makefile = (ROOT / "Makefile").read_text()
    assert "0.0.0.0" not in makefile
    hosts = re.findall(r"--host[ =](\S+)", makefile)
    assert all(h in ("127.0.0.1", "$(SERVE_HOST)") for h in hosts), hosts


def test_serve_never_passes_on_settings_that_switch_the_protection_off(tmp_path, monkeypatch):
    from pipelines.ops import servers

    unsafe = {"MLFLOW_SERVER_ALLOWED_HOSTS": "*", "MLFLOW_SERVER_CORS_ALLOWED_ORIGINS": "*",
              "MLFLOW_SERVER_DISABLE_SECURITY_MIDDLEWARE": "true"}
    for key, value in unsafe.items():
        monkeypatch.setenv(key, value)
    cfg = servers.ServeConfig.from_env(tmp_path, {})
    for service in ("mlflow", "prefect", "worker"):
        env = servers.environment(cfg, service)
        assert not set(unsafe) & set(env), service
        assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"


def _listening_addresses(port: int) -> set[str]:
    """Local addresses (hex, as in /proc/net/tcp*) of sockets listening on ``port``."""
    addresses = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                addresses.add(address)
    return addresses


@pytest.fixture(scope="module")
def project_mlflow(tmp_path_factory):
    """``mlflow server`` with the command and environment ``make serve`` uses."""
    from pipelines.ops import servers

    root = tmp_path_factory.mktemp("served")
    cfg = servers.ServeConfig.from_env(root, {"MLFLOW_PORT": str(free_port())})
    argv = servers.commands(cfg, "pool", "worker-1")["mlflow"]
    env = servers.environment(cfg, "mlflow")
    cfg.mlflow_artifacts.mkdir(parents=True, exist_ok=True)
    server = MlflowServer(root, port=cfg.mlflow_port, argv=argv, env=env).start()
    yield server
    server.stop()


@pytest.mark.slow
def test_mlflow_server_listens_on_loopback_only(project_mlflow):
    assert _listening_addresses(project_mlflow.port) == {"0100007F"}  # 127.0.0.1


SEARCH = "/api/2.0/mlflow/experiments/search?max_results=5"
CREATE = "/api/2.0/mlflow/experiments/create"


@pytest.mark.slow
@pytest.mark.parametrize("host, allowed", [
    ("127.0.0.1:{port}", True), ("localhost:{port}", True),
    (FOREIGN, False), (f"{FOREIGN}:{{port}}", False), ("mlflow.attacker.io", False),
])
def test_mlflow_server_checks_the_host_header(project_mlflow, host, allowed):
    """DNS rebinding: a page on a foreign name that resolves to 127.0.0.1 sends its own name as
    Host; the server must refuse it."""
    status, body = request(project_mlflow.url + SEARCH,
                           headers={"Host": host.format(port=project_mlflow.port)})
    if allowed:
        assert status == 200, body
    else:
        assert status == 403 and "Invalid Host header" in body


def _create(server: MlflowServer, name: str, origin: str | None) -> tuple[int, str]:
    headers = {"Content-Type": "application/json", **({"Origin": origin} if origin else {})}
    return request(server.url + CREATE, method="POST", headers=headers,
                   body=json.dumps({"name": name}).encode())


def _preflight(server: MlflowServer, origin: str) -> str | None:
    """The Access-Control-Allow-Origin a browser's CORS preflight for a POST gets back."""
    req = urllib.request.Request(server.url + CREATE, method="OPTIONS", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.headers.get("Access-Control-Allow-Origin")
    except urllib.error.HTTPError as exc:
        return exc.headers.get("Access-Control-Allow-Origin")


def _experiments(server: MlflowServer) -> set[str]:
    status, body = request(server.url + SEARCH.replace("5", "100"))
    assert status == 200, body
    return {e["name"] for e in json.loads(body).get("experiments", [])}


@pytest.mark.slow
def test_mlflow_server_refuses_cross_origin_writes(project_mlflow):
    """CSRF: a foreign web page may not change the store through the user's browser; the UI
    (same origin) and scripts (no Origin header) may."""
    status, body = _create(project_mlflow, "from-evil", f"http://{FOREIGN}")
    assert status == 403 and "Cross-origin request blocked" in body
    status, body = _create(project_mlflow, "from-evil-https", f"https://{FOREIGN}:443")
    assert status == 403
    allowed_origin = _preflight(project_mlflow, f"http://{FOREIGN}")
    assert allowed_origin is None  # the browser is told nothing it could use
    assert _preflight(project_mlflow, project_mlflow.url) == project_mlflow.url
    assert _create(project_mlflow, "from-ui", project_mlflow.url)[0] == 200
    assert _create(project_mlflow, "from-script", None)[0] == 200
    assert {"from-ui", "from-script"} <= _experiments(project_mlflow)
    assert not {"from-evil", "from-evil-https"} & _experiments(project_mlflow)

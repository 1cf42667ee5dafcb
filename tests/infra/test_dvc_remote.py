"""infra/dvc-remote.sh: the S3 remote in DVC's own configuration (read back with ``dvc remote
list`` / ``dvc config``), never a credential in it; and a real ``dvc push`` / ``dvc pull``
through DVC's S3 plugin (dvc-s3) to an S3 server on loopback (moto), with the bucket made by
the compose stack's init step (infra/create_buckets.py)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.infra.conftest import INFRA

SCRIPT = INFRA / "dvc-remote.sh"
BIN = Path(sys.executable).parent


def _env(home: Path, **extra: str) -> dict[str, str]:
    return {"PATH": f"{BIN}:{os.environ.get('PATH', '')}", "HOME": str(home),
            "DVC_NO_ANALYTICS": "1", "DVC_SITE_CACHE_DIR": str(home / "dvc-site"),
            "GIT_CONFIG_GLOBAL": str(home / "gitconfig"), **extra}


def _run(cmd, repo: Path, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert done.returncode == 0, f"{cmd}: {done.stdout}\n{done.stderr}"
    return done


@pytest.fixture
def repo(tmp_path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    env = _env(tmp_path)
    _run(["git", "init", "-q"], repo, env)
    _run(["dvc", "init", "-q"], repo, env)
    return repo


def _configure(repo: Path, **variables: str) -> subprocess.CompletedProcess:
    return _run([str(SCRIPT)], repo, _env(repo.parent, **variables), check=False)


def _dvc(repo: Path, *args: str, **env: str) -> str:
    return _run(["dvc", *args], repo, _env(repo.parent, **env)).stdout.strip()


def test_configures_a_default_s3_remote_with_an_endpoint(repo):
    done = _configure(repo, DVC_REMOTE_URL="s3://dvc/detr-ops",
                      DVC_REMOTE_ENDPOINT="http://127.0.0.1:9000", DVC_REMOTE_REGION="us-east-1")
    assert done.returncode == 0, done.stderr
    assert _dvc(repo, "remote", "list").split() == ["storage", "s3://dvc/detr-ops", "(default)"]
    assert _dvc(repo, "config", "core.remote") == "storage"
    assert _dvc(repo, "config", "remote.storage.endpointurl") == "http://127.0.0.1:9000"
    assert _dvc(repo, "config", "remote.storage.region") == "us-east-1"
    assert "no AWS_ACCESS_KEY_ID" in done.stderr  # tells the user where credentials go


def test_rerun_updates_in_place_and_can_drop_the_endpoint(repo):
    assert _configure(repo, DVC_REMOTE_URL="s3://dvc/a",
                      DVC_REMOTE_ENDPOINT="http://127.0.0.1:9000").returncode == 0
    assert _configure(repo, DVC_REMOTE_URL="s3://dvc/b").returncode == 0
    assert _dvc(repo, "remote", "list").split() == ["storage", "s3://dvc/b", "(default)"]
    # The endpoint is gone: it now comes from AWS_ENDPOINT_URL, if any.
    assert _dvc(repo, "config", "remote.storage.endpointurl") == ""
    assert "endpointurl" not in (repo / ".dvc" / "config").read_text()


def test_local_scope_stays_out_of_the_committed_config(repo):
    committed = (repo / ".dvc" / "config").read_text()
    done = _configure(repo, DVC_REMOTE_URL="s3://dvc/mine", DVC_REMOTE_SCOPE="local",
                      DVC_REMOTE_NAME="mine")
    assert done.returncode == 0, done.stderr
    assert (repo / ".dvc" / "config").read_text() == committed
    assert "s3://dvc/mine" in (repo / ".dvc" / "config.local").read_text()
    assert _dvc(repo, "remote", "default") == "mine"
    ignored = _run(["git", "check-ignore", "-q", ".dvc/config.local"], repo, _env(repo.parent),
                   check=False)
    assert ignored.returncode == 0


@pytest.mark.parametrize(("variables", "message"), [
    ({}, "DVC_REMOTE_URL is not set"),
    ({"DVC_REMOTE_URL": "https://bucket/x"}, "expected s3://"),
    ({"DVC_REMOTE_URL": "s3://Bad_Bucket/x"}, "valid bucket name"),
    ({"DVC_REMOTE_URL": "s3://dvc/x", "DVC_REMOTE_SCOPE": "global"}, "expected project or local"),
    ({"DVC_REMOTE_URL": "s3://dvc/x", "DVC_REMOTE_ENDPOINT": "http://user:pw@host:9000"},
     "no credentials"),
])
def test_bad_settings_are_refused_and_nothing_changes(repo, variables, message):
    before = (repo / ".dvc" / "config").read_text()
    done = _configure(repo, **variables)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert (repo / ".dvc" / "config").read_text() == before


def test_refuses_a_config_that_holds_credentials(repo):
    _dvc(repo, "remote", "add", "--local", "old", "s3://dvc/old")
    _dvc(repo, "remote", "modify", "--local", "old", "secret_access_key", "hunter2")
    done = _configure(repo, DVC_REMOTE_URL="s3://dvc/x")
    assert done.returncode == 2 and ".dvc/config.local holds S3 credentials" in done.stderr


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
@pytest.mark.parametrize("endpoint_in", ["config", "environment"])
def test_push_and_pull_through_s3(repo, s3_server, endpoint_in):
    """The bucket is created by the stack's init step; data goes up with ``dvc push``, the
    cache and workspace copy are deleted, ``dvc pull`` brings back the same bytes. The keys
    are only ever in the environment."""
    creds = s3_server.env
    bucket = f"dvc-{endpoint_in}"
    made = subprocess.run([sys.executable, str(INFRA / "create_buckets.py"), bucket,
                           "--endpoint", s3_server.endpoint, "--wait-s", "10"],
                          env={**os.environ, **creds}, capture_output=True, text=True, timeout=60)
    assert made.returncode == 0 and f"{bucket}: created" in made.stdout, made.stderr
    settings = {"DVC_REMOTE_URL": f"s3://{bucket}/detr-ops", "DVC_REMOTE_REGION": "us-east-1"}
    runtime = dict(creds)
    if endpoint_in == "config":
        settings["DVC_REMOTE_ENDPOINT"] = s3_server.endpoint
    else:
        runtime["AWS_ENDPOINT_URL"] = s3_server.endpoint
    assert _configure(repo, **settings).returncode == 0

    data = repo / "data" / "dataset"
    (data / "images").mkdir(parents=True)
    for i in range(5):
        (data / "images" / f"{i}.bin").write_bytes(os.urandom(2048 + i))
    (data / "annotations.json").write_text('{"images": []}')
    original = _digest(data)
    _dvc(repo, "add", "data/dataset")
    pushed = _dvc(repo, "push", **runtime)
    keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=bucket)["Contents"]]
    assert len(keys) == 7, (pushed, keys)  # 6 files + the folder's .dir listing
    assert all(k.startswith("detr-ops/files/md5/") for k in keys)

    shutil.rmtree(data)
    shutil.rmtree(repo / ".dvc" / "cache")
    _dvc(repo, "pull", **runtime)
    assert _digest(data) == original
    for config in (repo / ".dvc").glob("config*"):
        text = config.read_text()
        assert creds["AWS_SECRET_ACCESS_KEY"] not in text and creds["AWS_ACCESS_KEY_ID"] not in text

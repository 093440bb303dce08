"""docker/compose.yaml as data: the stack's services, their health checks and start order, the optional
GPU worker, the example .env wiring the pieces together without a secret in the file, the
create-bucket service's own command run against a local S3 server, and the file checked against the
compose specification's JSON schema (check-jsonschema's bundled copy, offline)."""

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parents[1]
DOCKER = ROOT / "docker"


_VAR = re.compile(r"\$\{([A-Za-z0-9_]+)(?:(:?[-?])([^}]*))?\}")


def _interpolate(value, env: dict):
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error} over a parsed compose file."""
    if isinstance(value, dict):
        return {k: _interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m):
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if env.get(name):
            return env[name]
        if op and op.endswith("?"):
            raise KeyError(f"{name}: {arg}")
        return arg if op else ""

    return _VAR.sub(sub, value)


def _dotenv(path: Path) -> dict:
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            k, _, v = line.partition("=")
            out[k.strip()] = v.strip()
    return out


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def test_compose_stack_services_health_and_order(compose):
    s = compose["services"]
    assert set(s) == {"postgres", "prefect-server", "minio", "create-bucket", "worker-cpu", "worker-gpu"}
    assert "pg_isready" in " ".join(s["postgres"]["healthcheck"]["test"])
    assert "postgres-data" in compose["volumes"] and any("postgres-data:" in v for v in s["postgres"]["volumes"])
    assert "/api/health" in " ".join(s["prefect-server"]["healthcheck"]["test"])
    assert s["prefect-server"]["command"][:3] == ["prefect", "server", "start"]
    assert s["minio"]["healthcheck"]["test"] and "minio-data" in compose["volumes"]
    # Start order by health, not by start: a worker that starts before the server's schema exists
    # crashes, and one that starts before the bucket exists fails its first run.
    assert s["prefect-server"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert s["create-bucket"]["depends_on"] == {"minio": {"condition": "service_healthy"}}
    for worker, pool in (("worker-cpu", "cloob-cpu"), ("worker-gpu", "cloob-gpu")):
        w = s[worker]
        assert w["depends_on"] == {"prefect-server": {"condition": "service_healthy"},
                                   "create-bucket": {"condition": "service_completed_successfully"}}
        # The GPU worker takes one flow run at a time: a training and an evaluation never share its GPUs.
        assert w["command"] == ["prefect", "worker", "start", "--pool", pool, "--type", "process",
                                *(["--limit", "1"] if worker == "worker-gpu" else [])]
        assert w["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"} <= set(w["environment"])
        assert (ROOT / w["build"]["dockerfile"]).is_file() and (DOCKER / w["build"]["context"]).resolve() == ROOT
    assert s["worker-cpu"]["build"]["dockerfile"] == "docker/Dockerfile.cpu"
    assert s["worker-gpu"]["build"]["dockerfile"] == "docker/Dockerfile.gpu"


def test_compose_gpu_worker_is_optional_and_reserves_nvidia_gpus(compose):
    s = compose["services"]
    assert s["worker-gpu"]["profiles"] == ["gpu"]
    assert all("profiles" not in v for k, v in s.items() if k != "worker-gpu")  # the rest starts by default
    devices = s["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert s["worker-gpu"]["shm_size"]  # DataLoader workers need more than Docker's 64 MB /dev/shm


def test_compose_with_the_example_env_connects_the_pieces_and_holds_no_secret(compose):
    example = _dotenv(DOCKER / ".env.example")
    s = _interpolate(compose, example)["services"]
    pg = s["postgres"]["environment"]
    url = s["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert url == (f"postgresql+asyncpg://{pg['POSTGRES_USER']}:{example['POSTGRES_PASSWORD']}@postgres:5432/"
                   f"{pg['POSTGRES_DB']}")
    # The workers' S3 keys are MinIO's root user, and the endpoint is the minio service.
    w = s["worker-cpu"]["environment"]
    assert (w["AWS_ACCESS_KEY_ID"], w["AWS_SECRET_ACCESS_KEY"]) == (s["minio"]["environment"]["MINIO_ROOT_USER"],
                                                                     s["minio"]["environment"]["MINIO_ROOT_PASSWORD"])
    assert w["AWS_ENDPOINT_URL"] == "http://minio:9000" and len(w["AWS_SECRET_ACCESS_KEY"]) >= 8  # MinIO's minimum
    # No secret is written into compose.yaml: each comes from .env and compose refuses to start without it.
    raw = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    for svc in raw["services"].values():
        for k, v in (svc.get("environment") or {}).items():
            if re.search(r"SECRET|PASSWORD", k):
                assert re.fullmatch(r"\$\{[A-Z0-9_]+:\?[^}]+\}", v), (k, v)
    with pytest.raises(KeyError, match="POSTGRES_PASSWORD"):
        _interpolate(raw, {k: v for k, v in example.items() if k != "POSTGRES_PASSWORD"})
    assert ".env" in (DOCKER / ".gitignore").read_text().split()


def test_compose_bucket_job_creates_the_bucket_through_s3fs(compose, s3_server, tmp_path):
    """The create-bucket service's own command, run against a local S3 server."""
    svc = _interpolate(compose, _dotenv(DOCKER / ".env.example"))["services"]["create-bucket"]
    env = {**os.environ, **svc["environment"], "AWS_ENDPOINT_URL": s3_server, "CLOOB_BUCKET": "cloob-test-bucket",
           "AWS_CONFIG_FILE": str(tmp_path / "none"), "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none")}
    assert svc["command"][0] == "python"
    command = [sys.executable, *svc["command"][1:]]  # the image's `python` is its venv's (PATH)
    for _ in range(2):  # and again: a restarted stack finds the bucket there
        out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert "bucket cloob-test-bucket ready" in out.stdout
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3_server, key=env["AWS_ACCESS_KEY_ID"], secret=env["AWS_SECRET_ACCESS_KEY"])
    assert fs.exists("cloob-test-bucket")


def _check_compose_spec(path: Path) -> subprocess.CompletedProcess:
    """check-jsonschema with the compose specification's schema it bundles (offline)."""
    return subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
                           str(path)], capture_output=True, text=True, timeout=120)


def test_compose_file_follows_the_compose_specification(compose, tmp_path):
    out = _check_compose_spec(DOCKER / "compose.yaml")
    assert out.returncode == 0 and "validation done" in out.stdout, out.stdout + out.stderr
    # and the check can fail: a misspelt key, a wrong type.
    broken = copy.deepcopy(compose)
    broken["services"]["worker-cpu"]["depend_on"] = broken["services"]["worker-cpu"].pop("depends_on")
    broken["services"]["postgres"]["healthcheck"]["test"] = 5
    (tmp_path / "compose.yaml").write_text(yaml.safe_dump(broken))
    out = _check_compose_spec(tmp_path / "compose.yaml")
    assert out.returncode == 1 and "depend_on" in out.stdout and "healthcheck" in out.stdout, out.stdout + out.stderr

"""The Prefect server on a real PostgreSQL (started here with initdb on 127.0.0.1 and a free port):
deploy, run a flow through a process worker, read the final state back through the API *and* from the
database itself. Skips only when the PostgreSQL server binaries are not installed
(scripts/ci-system-deps.sh installs them).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.prefect_server import free_port, prefect_server, run_deployment, stop_process

pytestmark = pytest.mark.integration


PREFECT_YAML = REPO / "prefect.yaml"


def pg_bindir() -> Path | None:
    """The newest PostgreSQL server bin/ (Debian keeps it off PATH under /usr/lib/postgresql/N/bin)."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]))
    for d in reversed(candidates):
        if Path(d, "initdb").exists() and Path(d, "postgres").exists():
            return Path(d)
    found = shutil.which("initdb")
    return Path(found).resolve().parent if found else None


@dataclass
class Postgres:
    url: str  # SQLAlchemy URL for Prefect
    port: int
    bindir: Path
    password: str

    def psql(self, sql: str) -> str:
        out = subprocess.run([str(self.bindir / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "prefect",
                              "-d", "prefect", "-At", "-c", sql], env=dict(os.environ, PGPASSWORD=self.password),
                             capture_output=True, text=True, timeout=30, check=True)
        return out.stdout.strip()


@pytest.fixture
def postgres() -> Iterator[Postgres]:
    bindir = pg_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, postgres) not installed: run scripts/ci-system-deps.sh")
    # initdb refuses to run as root: run the cluster as the `postgres` system user when we are root
    user = None
    if os.geteuid() == 0:
        import pwd

        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and no `postgres` user to own the test cluster")
    # under /tmp (world-traversable): pytest's tmp_path parents are private to root
    root = Path(tempfile.mkdtemp(prefix="distilflow-pg-"))
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    password = os.urandom(12).hex()
    (root / "pw").write_text(password)
    if user is not None:
        for p in (root, sock, root / "pw"):
            os.chown(p, user.pw_uid, user.pw_gid)
    run_as = {"user": user.pw_uid, "group": user.pw_gid} if user is not None else {}
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["HOME"] = str(root)
    proc = None
    try:
        subprocess.run([str(bindir / "initdb"), "-D", str(data), "-U", "prefect", "-E", "UTF8", "--no-locale",
                        "--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={root / 'pw'}"],
                       check=True, capture_output=True, timeout=120, env=env, cwd=root, **run_as)
        port = free_port()
        log = open(root / "postgres.log", "wb")  # noqa: SIM115 - closed in finally
        # -h 127.0.0.1: TCP on loopback only; -k: our own socket dir (not /var/run/postgresql)
        proc = subprocess.Popen([str(bindir / "postgres"), "-D", str(data), "-h", "127.0.0.1", "-p", str(port),
                                 "-k", str(sock), "-c", "fsync=off", "-c", "max_connections=50"],
                                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True,
                                **run_as)
        for _ in range(120):
            ready = subprocess.run([str(bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)],
                                   capture_output=True)
            if ready.returncode == 0:
                break
            assert proc.poll() is None, (root / "postgres.log").read_text()
            import time

            time.sleep(0.25)
        else:
            pytest.fail("PostgreSQL did not become ready:\n" + (root / "postgres.log").read_text())
        pg = Postgres(url=f"postgresql+asyncpg://prefect:{password}@127.0.0.1:{port}/prefect", port=port,
                      bindir=bindir, password=password)
        subprocess.run([str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "prefect", "prefect"],
                       env=dict(env, PGPASSWORD=password), check=True, capture_output=True, timeout=30)
        yield pg
    finally:
        if proc is not None:
            stop_process(proc, timeout=30)
        shutil.rmtree(root, ignore_errors=True)


def test_prefect_server_on_postgres_runs_a_deployment(postgres, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    with prefect_server(tmp_path, database_url=postgres.url) as server:
        # the server really is on PostgreSQL: its schema was migrated into our database
        assert int(postgres.psql("select count(*) from information_schema.tables where table_name = 'flow_run'")) == 1
        env = dict(server.env, GPU_POOL_TYPE="process", PYTHON=sys.executable)
        out = subprocess.run(["bash", str(REPO / "infra" / "create-pools.sh")], env=env, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        server.env["DISTILFLOW_DATA"] = str(data)
        server.prefect("deploy", "--name", "doctor", "--prefect-file", str(PREFECT_YAML), cwd=REPO, timeout=180)
        with server.worker("cpu", name="pg-worker"):
            run = run_deployment(server, "doctor/doctor", timeout=120)
        assert run.state.is_completed(), f"{run.state}\n{server.worker_log('pg-worker')}"
        # read the state back from the database itself, not only through the API
        row = postgres.psql(f"select state_type, deployment_id is not null from flow_run where id = '{run.id}'")
        assert row == "COMPLETED|t"
        assert postgres.psql("select count(*) from artifact where key = 'doctor'") == "1"
        assert postgres.psql("select name from work_pool order by name") == "cpu\ngpu"

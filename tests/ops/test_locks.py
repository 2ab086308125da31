"""The lock files say what they mean (issue 15): hashed, runtime and dev sets separate and consistent, the
torch build explicit, loose ranges in pyproject.toml. Static checks; installing from them is what CI does."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LOCKS = {name: REPO / name for name in ("requirements.lock", "requirements-dev.lock", "requirements-cuda.lock")}
DEV_TOOLS = {"pytest", "pytest-timeout", "hypothesis", "ruff", "mypy", "moto", "pip-tools"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(path: Path) -> dict[str, tuple[str, list[str]]]:
    """name -> (version, hashes) of a pip-compile --generate-hashes file; fails on an unhashed line."""
    out: dict[str, tuple[str, list[str]]] = {}
    text = re.sub(r"\\\n", " ", path.read_text())
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)((?:\s+--hash=sha256:[0-9a-f]{64})+)", line)
        assert m, f"{path.name}: not an exact, hashed pin: {line[:100]}"
        out[_norm(m[1])] = (m[2], re.findall(r"sha256:([0-9a-f]{64})", m[3]))
    return out


@pytest.fixture(scope="module")
def locks() -> dict[str, dict[str, tuple[str, list[str]]]]:
    return {name: pins(path) for name, path in LOCKS.items()}


def test_every_requirement_is_pinned_and_hashed(locks):
    for name, lock in locks.items():
        assert len(lock) > 100, name
        assert all(hashes for _, hashes in lock.values()), name


def test_torch_build_is_explicit(locks):
    assert locks["requirements.lock"]["torch"][0] == "2.13.0+cpu"
    assert locks["requirements-dev.lock"]["torch"] == locks["requirements.lock"]["torch"]
    assert locks["requirements-cuda.lock"]["torch"][0] == "2.13.0"  # PyPI's build: CUDA
    assert not any(n.startswith("nvidia-") or n == "triton" for n in locks["requirements.lock"]), \
        "the CPU lock must not pull CUDA packages"
    assert any(n.startswith("nvidia-cudnn") for n in locks["requirements-cuda.lock"])
    # the lock's own torch build is named by the file the constraints come from
    assert "torch==2.13.0+cpu" in (REPO / "requirements" / "torch-cpu.txt").read_text()
    assert "torch==2.13.0\n" in (REPO / "requirements" / "torch-cuda.txt").read_text()


def test_runtime_sets_have_no_dev_tools_and_agree(locks):
    cpu, cuda, dev = locks["requirements.lock"], locks["requirements-cuda.lock"], locks["requirements-dev.lock"]
    assert not DEV_TOOLS & set(cpu) and not DEV_TOOLS & set(cuda)
    assert set(dev) >= DEV_TOOLS
    # the dev set is the runtime set plus tools: same pins, same files
    assert {n: v for n, v in dev.items() if n in cpu} == cpu
    # both runtime locks agree on everything but torch and what only the CUDA build needs
    shared = (set(cpu) & set(cuda)) - {"torch"}
    assert {n: cpu[n] for n in shared} == {n: cuda[n] for n in shared}
    assert set(cpu) - set(cuda) == set()


def test_torch_cpu_hash_is_the_local_wheel_when_present(locks):
    import hashlib

    wheels = sorted(Path("/opt/wheels").glob("torch-2.13.0+cpu-cp311-*.whl"))
    if not wheels:
        pytest.skip("no local CPU torch wheel on this machine")
    digest = hashlib.sha256(wheels[0].read_bytes()).hexdigest()
    assert digest in locks["requirements.lock"]["torch"][1]


def test_pyproject_has_loose_ranges_only():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"] + [d for ds in project["optional-dependencies"].values() for d in ds]
    assert not [d for d in deps if "==" in d], "exact pins belong in the lock files"
    torch = next(d for d in project["dependencies"] if _norm(re.split(r"[<>=!~\[ ]", d)[0]) == "torch")
    assert "<" in torch and ">=" in torch, "torch: a range a user's own build satisfies, with an upper bound"
    assert project["requires-python"] == ">=3.11,<3.12"  # what the locks are resolved for


def test_every_runtime_dependency_is_locked(locks):
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for dep in project["dependencies"]:
        name = _norm(re.split(r"[<>=!~\[ ;]", dep)[0])
        for lock in ("requirements.lock", "requirements-cuda.lock"):
            assert name in locks[lock], f"{name} is in pyproject.toml but not in {lock}: run `make lock`"

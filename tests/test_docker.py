"""The Dockerfile and the cluster manifests name real files, extras, versions and commands.

Docker and Kubernetes cannot run here, so these tests read the files the way the tools would and
check them against the project: COPY sources, the pip install targets, the Ray version of the
base image, the user, and every `python -m jobs.<stage> ...` command with its options and
config overrides.
"""

from __future__ import annotations

import fnmatch
import importlib
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any, Iterator

import click
import pytest
import yaml

from pipeline.config import TrainJobConfig, load_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER_FILES = sorted((REPO / "conf" / "cluster").glob("*.yaml"))


def read_dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with comments dropped and continuation lines joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, rest = full.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    return instructions


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return read_dockerfile(REPO / "Dockerfile")


@pytest.fixture(scope="module")
def pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def args_of(instructions, keyword: str) -> list[str]:
    return [rest for kw, rest in instructions if kw == keyword]


def build_args(instructions) -> dict[str, str]:
    out = {}
    for rest in args_of(instructions, "ARG"):
        name, _, default = rest.partition("=")
        out[name.strip()] = default.strip().strip('"')
    return out


def test_base_image_is_rays_with_the_installed_ray_version(dockerfile, pyproject):
    import ray
    from packaging.requirements import Requirement
    from packaging.version import Version

    [base] = args_of(dockerfile, "FROM")
    assert base == "rayproject/ray:${RAY_TAG}"
    tag = build_args(dockerfile)["RAY_TAG"]
    match = re.fullmatch(r"(\d+\.\d+\.\d+)-py(\d)(\d+)-(cpu|gpu|cu\d+)", tag)
    assert match, f"RAY_TAG {tag} is not <ray version>-py<XY>-<cpu|gpu|cuXYZ>"
    image_ray, py_major, py_minor, _ = match.groups()
    # Head, workers and the client that submits must run the same Ray.
    assert Version(image_ray).release[:2] == Version(ray.__version__).release[:2]
    ray_req = next(Requirement(r) for r in pyproject["project"]["dependencies"] if r.startswith("ray"))
    assert ray_req.specifier.contains(image_ray), f"pyproject's {ray_req} excludes the image's Ray {image_ray}"
    requires_python = pyproject["project"]["requires-python"]
    from packaging.specifiers import SpecifierSet
    assert SpecifierSet(requires_python).contains(f"{py_major}.{py_minor}")


def test_copy_sources_exist_and_are_not_dockerignored(dockerfile):
    ignored = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    copies = args_of(dockerfile, "COPY")
    assert copies
    sources = []
    for rest in copies:
        parts = [p for p in shlex.split(rest) if not p.startswith("--")]
        sources += parts[:-1]
    for src in sources:
        assert (REPO / src).exists(), f"COPY {src}: no such file in the repository"
        name = src.rstrip("/")
        assert not any(fnmatch.fnmatch(name, pattern) for pattern in ignored), \
            f"COPY {src} is excluded by .dockerignore"
    # Everything pyproject's build needs: the packages and the readme it names.
    assert {"pyproject.toml", "README.md", "pipeline/", "jobs/", "conf/"} <= set(sources)


def test_pip_installs_the_project_and_pyprojects_torch(dockerfile, pyproject):
    runs = args_of(dockerfile, "RUN")
    installs = [shlex.split(r.split("&&")[0]) for r in runs if "pip install" in r]
    targets = [arg for cmd in installs for arg in cmd[cmd.index("install") + 1:] if not arg.startswith("-")
               and not arg.startswith("${")]
    projects = [t for t in targets if t == "." or t.startswith(".[")]
    assert projects, f"no `pip install .` in {installs}"
    extras = set(pyproject["project"].get("optional-dependencies", {}))
    for target in projects:
        for extra in re.findall(r"\[(.*)\]", target)[0].split(",") if "[" in target else []:
            assert extra.strip() in extras, f"pip install {target}: pyproject has no extra {extra!r}"
    torch_req = next(r for r in pyproject["project"]["dependencies"] if r.startswith("torch"))
    assert torch_req.replace(" ", "") in [t.replace(" ", "") for t in targets], \
        f"the image's torch should be pyproject's range {torch_req}"


def test_runs_as_the_images_non_root_user(dockerfile):
    users = args_of(dockerfile, "USER")
    assert users and users[-1] not in ("root", "0", "0:0")
    assert users[-1].split(":")[0] == "ray"
    assert args_of(dockerfile, "WORKDIR")[-1] == "/home/ray/lstm-pipeline"


def test_dockerignore_keeps_data_runs_and_envs_out():
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()}
    for entry in ("data", "mlflow.db", "mlartifacts", "mlruns", "ray_results", ".venv", ".git",
                  "**/__pycache__"):
        assert entry in ignored


# --------------------------------------------------------------------------- cluster manifests


def strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from strings(value)


def load_docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def check_stage_command(command: str) -> click.Context:
    """Parse `python -m jobs.<stage> ARGS` with the stage's own click command; for train, load the
    config and overrides through the real config classes. Returns the parsed context."""
    argv = shlex.split(command)
    assert argv[:2] == ["python", "-m"] and argv[2].startswith("jobs."), command
    module = importlib.import_module(argv[2])  # a real module
    stage = argv[2].split(".", 1)[1]
    cmd: click.Command = getattr(module, stage)
    known = {opt for param in cmd.params if isinstance(param, click.Option)
             for opt in param.opts + param.secondary_opts}
    for arg in argv[3:]:
        if arg.startswith("-"):
            assert arg.split("=")[0] in known, f"{argv[2]} has no option {arg} (known: {sorted(known)})"
    ctx = cmd.make_context(stage, argv[3:])  # raises on a bad option or value
    if stage == "train":
        config = ctx.params["config_path"]
        if config is not None:
            assert (REPO / config).is_file(), f"{config} is not in the image's WORKDIR (the repo)"
        load_config(TrainJobConfig, REPO / config if config else None, list(ctx.params["overrides"]))
    return ctx


def test_cluster_files_exist_outside_the_config_glob():
    # tests/test_config.py loads every conf/*.yaml as a job config; these are not job configs.
    assert {p.name for p in CLUSTER_FILES} >= {"rayjob.yaml", "ray-up.yaml"}
    assert not (REPO / "conf" / "rayjob.yaml").exists()


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_every_job_command_in_the_manifests_is_real(path):
    commands = [s for doc in load_docs(path) for s in strings(doc) if "python -m jobs." in s]
    for command in commands:
        check_stage_command(command[command.index("python -m jobs."):])


def test_rayjob_trains_on_gpu_workers_with_the_project_image():
    import ray

    [job] = [d for d in load_docs(REPO / "conf" / "cluster" / "rayjob.yaml") if d.get("kind") == "RayJob"]
    assert job["apiVersion"] == "ray.io/v1"
    ctx = check_stage_command(job["spec"]["entrypoint"])
    cfg = load_config(TrainJobConfig, REPO / ctx.params["config_path"], list(ctx.params["overrides"]))
    assert cfg.scaling.use_gpu and cfg.scaling.num_workers == 2
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"].split(".")[:2] == ray.__version__.split(".")[:2]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    [gpu_group] = cluster["workerGroupSpecs"]
    worker = gpu_group["template"]["spec"]["containers"][0]
    assert head["image"] == worker["image"]  # one image for head and workers
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert gpu_group["replicas"] * int(worker["resources"]["limits"]["nvidia.com/gpu"]) >= cfg.scaling.num_workers
    for container in (head, worker):
        env = {e["name"]: e for e in container["env"]}
        for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            assert "secretKeyRef" in env[name]["valueFrom"] and "value" not in env[name], name
    # Shared storage: a pod's local disk is invisible to the others.
    assert all(p.startswith("s3://") for p in (cfg.data.train_path, cfg.data.val_path, cfg.train.storage_path))
    assert cluster["authOptions"]["mode"] == "token"


def test_ray_up_runs_the_same_image_with_token_auth():
    [up] = load_docs(REPO / "conf" / "cluster" / "ray-up.yaml")
    [job] = [d for d in load_docs(REPO / "conf" / "cluster" / "rayjob.yaml") if d.get("kind") == "RayJob"]
    image = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    assert up["docker"]["image"] == image
    assert up["head_node_type"] in up["available_node_types"]
    assert "--env RAY_AUTH_MODE=token" in up["docker"]["run_options"]
    assert "~/.ray/auth_token" in up["file_mounts"]
    assert any("ray start --head" in c for c in up["head_start_ray_commands"])
    assert any("ray start --address=$RAY_HEAD_IP:6379" in c for c in up["worker_start_ray_commands"])

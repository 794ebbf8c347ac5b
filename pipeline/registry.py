"""Which model a job means: a registry reference resolved to a pinned version, and its files.

    model = resolve_model("models:/lstm-classifier@current", mlc, tracking_uri)
    model.uri, model.version, model.spec, model.state_dict    # models:/lstm-classifier/3, ...

`--model` takes models:/NAME@ALIAS, models:/NAME/VERSION (or /latest), models:/m-<id> (a logged
model), runs:/RUN_ID/model, a local model directory, or a bare registered NAME (its newest
version). An unknown one is one error naming what the registry holds.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Any

from pipeline.errors import PipelineError
from pipeline.model import ModelSpec


@dataclass
class ResolvedModel:
    uri: str
    """A pinned URI the actors load (models:/NAME/VERSION, runs:/..., or a local directory)."""
    name: str | None
    version: str | None
    run_id: str | None
    spec: ModelSpec
    state_dict: dict[str, Any]
    """The weights, loaded once on the driver and shipped to the actors through the object store."""


def resolve_model(ref: str, mlc, tracking_uri: str) -> ResolvedModel:
    """Resolve a model reference to a pinned URI plus its metadata, or fail naming what exists."""
    from mlflow.exceptions import MlflowException

    name = version = run_id = None
    if os.path.isdir(ref):
        uri = os.path.abspath(ref)
    elif ref.startswith("models:/"):
        rest = ref[len("models:/"):]
        if "@" in rest:
            name, alias = rest.split("@", 1)
            try:
                mv = mlc.get_model_version_by_alias(name, alias)
            except MlflowException:
                raise PipelineError(f"model {ref} not found: {_what_exists(mlc, name)}") from None
            version = str(mv.version)
        elif "/" in rest:
            name, version = rest.split("/", 1)
            if version.lower() == "latest":
                version = _latest_version(mlc, name, ref)
            try:
                mv = mlc.get_model_version(name, version)
            except MlflowException:
                raise PipelineError(f"model {ref} not found: {_what_exists(mlc, name)}") from None
        else:  # models:/m-<id>, a logged model
            try:
                logged = mlc.get_logged_model(rest)
            except MlflowException:
                raise PipelineError(f"model {ref} not found: no logged model with id {rest}") from None
            uri, run_id = ref, logged.source_run_id
            mv = None
        if mv is not None:
            uri, run_id = f"models:/{name}/{version}", mv.run_id
    elif ref.startswith("runs:/"):
        uri = ref
        run_id = ref[len("runs:/"):].split("/", 1)[0]
    elif "://" in ref or ref.startswith(("/", ".")):
        raise PipelineError(f"model {ref} not found: give models:/NAME@ALIAS, models:/NAME/VERSION, "
                            "runs:/RUN_ID/model, a registered model name or an existing directory")
    else:
        name = ref
        version = _latest_version(mlc, name, ref)
        uri, run_id = f"models:/{name}/{version}", mlc.get_model_version(name, version).run_id
    spec, state_dict = _load_model_files(uri, ref, tracking_uri)
    return ResolvedModel(uri=uri, name=name, version=version, run_id=run_id, spec=spec,
                         state_dict=state_dict)


def _latest_version(mlc, name: str, ref: str) -> str:
    from mlflow.exceptions import MlflowException

    try:
        versions = mlc.search_model_versions(f"name='{name}'")
    except MlflowException:
        versions = []
    if not versions:
        raise PipelineError(f"model {ref} not found: {_what_exists(mlc, name)}")
    return str(max(int(v.version) for v in versions))


def _what_exists(mlc, name: str) -> str:
    """A hint naming what the registry does hold."""
    from mlflow.exceptions import MlflowException

    try:
        rm = mlc.get_registered_model(name)
    except MlflowException:
        names = sorted(m.name for m in mlc.search_registered_models(max_results=20))
        return (f"no registered model {name!r}; registered models: {', '.join(names)}" if names
                else f"no registered model {name!r} and the model registry is empty: "
                     "train one first (`lstm-pipeline train`) or check the tracking URI")
    aliases = sorted(rm.aliases) if rm.aliases else []
    versions = sorted(int(v.version) for v in mlc.search_model_versions(f"name='{name}'"))
    return (f"{name!r} has versions {', '.join(map(str, versions)) or 'none'}"
            f"{' and aliases ' + ', '.join('@' + a for a in aliases) if aliases else ' and no aliases'}")


def _load_model_files(uri: str, ref: str, tracking_uri: str) -> tuple[ModelSpec, dict]:
    """Download the model once; return its spec (meta.json) and weights (loaded `weights_only`):
    no code of the model's is run (unlike mlflow.pyfunc.load_model, which runs its model.py)."""
    import mlflow.artifacts
    import torch
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory() as tmp:
        local = uri
        if not os.path.isdir(uri):
            try:
                local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp,
                                                            tracking_uri=tracking_uri)
            except (MlflowException, OSError) as exc:
                raise PipelineError(f"model {ref} cannot be downloaded "
                                    f"({str(exc).splitlines()[0]}): check the URI and the "
                                    "tracking server") from None
        found = {f: os.path.join(root, f) for root, _, files in os.walk(local) for f in files
                 if f in ("meta.json", "weights.pt")}
        if len(found) < 2:
            raise PipelineError(f"model {ref} is not an lstm-pipeline model (no meta.json and "
                                "weights.pt artifacts): use a model logged by `lstm-pipeline train`")
        with open(found["meta.json"]) as fh:
            spec = ModelSpec.from_json(fh.read())
        state = torch.load(found["weights.pt"], map_location="cpu", weights_only=True)
    return spec, state

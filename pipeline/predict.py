"""Batch prediction: a registered model over Parquet shards with Ray Data, Parquet out.

    cfg = load_config(PredictJobConfig, "conf/predict.yaml",
                      ["predict.model=models:/lstm-classifier@current",
                       "predict.input_path=data/synth/val", "predict.output_path=predictions/val"])
    result = run_prediction(cfg)

`read_parquet` -> `map_batches(Predictor)` on an actor pool (the model loaded once per actor)
-> `write_parquet` into a temporary directory beside the target, renamed into place at the end:
the output appears whole or not at all.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import inspect
import json
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline import report, tracking
from pipeline.cluster import ray_connection
from pipeline.config import DataConfig, PredictJobConfig, dump_yaml, flatten, to_dict
from pipeline.console import Timeline, first_line, user_error_in
from pipeline.data import read_parquet_columns
from pipeline.errors import DataError, PipelineError, collect
from pipeline.model import ModelSpec, build_model, pad_arrow
from pipeline.redact import redact
from pipeline.registry import ResolvedModel, resolve_model
from pipeline.runtime import worker_env
from pipeline.shards import check_schema, inspect_files, list_shards, open_parquet
from pipeline.storage import Output, filesystem, remove
from pipeline.task import task_for

OUTPUT_COLUMNS = ("prediction", "probabilities", "label_name")
DONE_MARKER = "_DONE.json"
OUTPUT_ROWS_PER_FILE = 250_000
"""Rows per output file (at least; the last file of a chunk takes the rest): ~10 MB of predictions."""


@dataclass
class PredictResult:
    run_id: str
    output_path: str
    rows: int
    seconds: float
    rows_per_second: float
    accuracy: float | None
    model: ResolvedModel


# --------------------------------------------------------------------------- the actor


class Predictor:
    """Ray Data actor: builds the model once from its weights, maps Arrow batches to predictions.

    It needs torch and this package only, not MLflow: the driver resolved and downloaded the
    registered model once, so N actors do not each hit the registry (and start faster).
    """

    def __init__(self, spec: ModelSpec, state_dict: dict, features_column: str,
                 keep_columns: list[str], threads: int, use_gpu: bool):
        import torch

        torch.set_num_threads(threads)
        self.device = "cuda" if use_gpu else "cpu"
        self.module = build_model(spec)
        self.module.load_state_dict(state_dict)
        self.module.eval().to(self.device)
        self.task = task_for(spec)
        self.features_column = features_column
        self.keep_columns = keep_columns

    def __call__(self, batch: pa.Table) -> pa.Table:
        try:
            x, lengths, _ = pad_arrow(batch.column(self.features_column))
        except ValueError as exc:
            raise DataError(f"bad input rows: {exc}: run `lstm-pipeline data check --no-label PATH` "
                            "to find the file and row") from None
        columns = {name: batch.column(name) for name in self.keep_columns}
        return pa.table(columns | self.task.output_columns(self.module, x, lengths, self.device))


# --------------------------------------------------------------------------- the job


def _output_metrics(task, output: str, label_column: str, mlc, run_id: str) -> dict[str, float]:
    """The task's metrics of the written predictions against their labels, streamed."""
    fs, inner = filesystem(output)
    sums = None
    for frag in pq.ParquetDataset(inner, filesystem=fs).fragments:
        for batch in frag.to_batches(columns=[label_column, "prediction"]):
            part = task.output_sums(batch.column(0), batch.column(1))
            sums = part if sums is None else sums + part
    return {} if sums is None else task.output_metrics(sums, mlc, run_id)


RUN_FILE = "_RUN.json"
"""In the staging directory: the MLflow run that writes it, so a rerun after a crash continues
that run instead of leaving it RUNNING forever."""


@dataclass
class _Plan:
    """What run_prediction checked before any work."""

    output: Output
    files: list[str]
    rows: int
    features_column: str
    keep: list[str]
    has_label: bool


def _plan(cfg: PredictJobConfig, model: ResolvedModel, output: Output) -> _Plan:
    """Check the input against the model; choose the columns to keep."""
    p = cfg.predict
    features_column = cfg.data.features_column or model.spec.features_column
    files = list_shards(p.input_path, "--input")
    info = inspect_files(files, "--input", features_column=features_column,
                         sample_rows=DataConfig.sample_rows)
    collect(info.problems, DataError, "the input")
    if info.n_features != model.spec.n_features:
        raise DataError(f"the input has {info.n_features} features per step, the model "
                        f"{p.model} was trained on {model.spec.n_features}: use matching data "
                        "or another model")
    schema = open_parquet(files[0]).schema_arrow
    names = set(schema.names)
    has_label = cfg.data.label_column in names and not check_schema(
        files[0], schema, features_column, cfg.data.label_column, model.spec.regression)
    keep = p.passthrough_columns
    if keep is None:
        keep = [c for c in (cfg.data.id_column, cfg.data.label_column if has_label else None)
                if c and c in names]
    missing = [c for c in keep if c not in names]
    if missing or any(c in OUTPUT_COLUMNS for c in keep):
        raise PipelineError(f"predict.passthrough_columns: {', '.join(missing or keep)} "
                            f"{'not in the input' if missing else 'clashes with an output column'}"
                            f" (input columns: {', '.join(sorted(names))})")
    # The same staging directory for a rerun of the same job (output, model, columns), so a rerun
    # after a crash finds the finished chunks.
    key = hashlib.sha256(json.dumps([output.target, model.uri, features_column, keep]).encode())
    output.stage_at(key.hexdigest()[:12])
    return _Plan(output=output, files=files, rows=info.rows, features_column=features_column,
                 keep=keep, has_label=has_label)


def _interrupted_run(mlc, staging: str) -> str | None:
    """The run of an earlier attempt at this job that never ended (its process was killed)."""
    fs, inner = filesystem(staging)
    try:
        with fs.open_input_stream(f"{inner}/{RUN_FILE}") as fh:
            run_id = json.loads(fh.read())["run_id"]
        return run_id if mlc.get_run(run_id).info.status == "RUNNING" else None
    except Exception:  # noqa: BLE001  (no file, another store, a deleted run: start a new run)
        return None


def run_prediction(cfg: PredictJobConfig, *, command: str | None = None,
                   config_path: str | None = None,
                   console: Callable[[str], None] = print) -> PredictResult:
    """Validate, predict with Ray Data, write Parquet atomically, track in MLflow."""
    p = cfg.predict
    problems = [f"predict.{key} is required (--{flag})" for key, flag in
                (("model", "model"), ("input_path", "input"), ("output_path", "output"))
                if getattr(p, key) in (None, "", [])]
    collect(problems, PipelineError)
    timeline = Timeline()
    with timeline.phase("data_checks"):
        # The output's place and ownership are checked before anything else is done.
        output = Output(p.output_path, "predict", overwrite=p.overwrite,
                        inputs={"--input": p.input_path}, flag="--output")
    with timeline.phase("tracking"):
        uri, mlc, exp_id = tracking.open_experiment(
            cfg.tracking.tracking_uri, cfg.tracking.experiment, cfg.tracking.artifact_location)
    with timeline.phase("model_load"):
        model = resolve_model(p.model, mlc, uri)
    with timeline.phase("data_checks"):
        plan = _plan(cfg, model, output)

    run_name = cfg.tracking.run_name or f"predict-{model.name or 'model'}-v{model.version or 'x'}-" \
                                        f"{dt.datetime.now():%Y%m%d-%H%M%S}"
    tags = {"model_uri": model.uri, "model_name": str(model.name), "model_version": str(model.version),
            "model_run_id": str(model.run_id), "input_path": ",".join(plan.files[:20]),
            "output_path": output.target}
    tags |= report.source_tags("predict")
    resume_run_id = _interrupted_run(mlc, output.staging)
    if resume_run_id is None:
        tags["mlflow.note.content"] = report.description(command, config_path, dump_yaml(cfg))
    else:
        tags["resumed_with"] = command or "run_prediction()"
    with tracking.tracked_run(mlc, exp_id, run_name, tags, resume_run_id) as run_id:
        console(f"mlflow: run {run_id} in experiment {cfg.tracking.experiment!r} at {redact(uri)}"
                + (" (continuing the interrupted run of this job)" if resume_run_id else ""))
        console(f"model: {model.uri} (run {model.run_id}); input: {plan.rows} rows in "
                f"{len(plan.files)} files")
        with timeline.phase("tracking"):
            _record_inputs(mlc, run_id, cfg, model, plan, resumed=resume_run_id is not None)
        start = time.perf_counter()
        rows = _predict_chunks(cfg, model, plan, run_id, console, timeline)
        seconds = time.perf_counter() - start
        metrics = {"rows": rows, "seconds": seconds, "rows_per_second": rows / seconds}
        label = cfg.data.label_column
        if plan.has_label and label in plan.keep:
            metrics |= _output_metrics(task_for(model.spec), output.target, label, mlc, run_id)
        accuracy = metrics.get("accuracy")
        tracking.log_metrics(mlc, run_id, metrics | timeline.metrics())
        rmse_text = (f", RMSE {metrics['rmse']:.4f} MAE {metrics['mae']:.4f} R2 {metrics['r2']:.4f}"
                     if "rmse" in metrics else "")
        console(f"predicted {rows} rows in {seconds:.1f}s ({rows / seconds:.0f} rows/s)"
                f"{f', accuracy {accuracy:.4f}' if accuracy is not None else ''}"
                f"{rmse_text} -> {output.target}")
        console(f"time: {timeline.summary()}")
        return PredictResult(run_id=run_id, output_path=output.target, rows=rows, seconds=seconds,
                             rows_per_second=rows / seconds, accuracy=accuracy, model=model)


def _record_inputs(mlc, run_id: str, cfg: PredictJobConfig, model: ResolvedModel, plan: _Plan,
                   resumed: bool) -> None:
    """Params and the dataset input of a new run; the config of a continued one."""
    if resumed:
        mlc.log_text(run_id, redact(dump_yaml(cfg)), f"config-resume-{int(time.time())}.yaml")
        return
    report.log_datasets(mlc, run_id, [("predict", plan.files, plan.rows)], None)
    tracking.log_params(mlc, run_id, flatten(to_dict(cfg)) | {
        "model.resolved_uri": model.uri, "model.name": model.name, "model.version": model.version,
        "model.run_id": model.run_id, "input.rows": plan.rows})


def _no_actor_restarts() -> dict[str, int]:
    """Ray Data restarts a dead actor from arguments that may have been evicted from the object
    store (ray-project/ray#53727, and Ray warns on every run); a failed chunk is redone whole
    instead (predict.max_failures)."""
    return {"max_restarts": 0, "max_task_retries": 0}


def _predict_chunk(cfg: PredictJobConfig, model: ResolvedModel, plan: _Plan, chunk: list[str],
                   target: str) -> None:
    """Ray Data: read the chunk's files, run the actor pool, write Parquet into `target`."""
    import ray.data

    p = cfg.predict
    remove(target)
    ds = read_parquet_columns(chunk, sorted({plan.features_column, *plan.keep}),
                              cfg.data.parquet_reader)
    # Ray Data deprecates ray_remote_args_fn for 2.64; where it is gone, its own restarts apply.
    no_restarts = ({"ray_remote_args_fn": _no_actor_restarts} if "ray_remote_args_fn" in
                   inspect.signature(ray.data.Dataset.map_batches).parameters else {})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ds = ds.map_batches(
            Predictor,
            fn_constructor_kwargs=dict(spec=model.spec, state_dict=model.state_dict,
                                       features_column=plan.features_column,
                                       keep_columns=plan.keep, threads=p.cpus_per_actor,
                                       use_gpu=p.use_gpu),
            batch_size=p.batch_size, batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=p.num_actors),
            num_cpus=p.cpus_per_actor, num_gpus=1 if p.use_gpu else None,
            runtime_env={"env_vars": worker_env(p.reuse_memory)},
            udf_modifying_row_count=False,
            **no_restarts,
        )
    # Input blocks are small (BLOCK_BYTES); a file per block would be many tiny files.
    ds.write_parquet(target, min_rows_per_file=OUTPUT_ROWS_PER_FILE)
    _mark_done(target, chunk)


def _predict_chunks(cfg: PredictJobConfig, model: ResolvedModel, plan: _Plan, run_id: str,
                    console: Callable[[str], None], timeline: Timeline) -> int:
    """Predict every chunk not finished by an earlier attempt into the staging directory, then
    publish it; returns the rows written."""
    p, output = cfg.predict, plan.output
    staging = output.prepare()
    fs, inner = filesystem(staging)
    with fs.open_output_stream(f"{inner}/{RUN_FILE}") as fh:
        fh.write(json.dumps({"run_id": run_id}).encode())
    need = p.num_actors * p.cpus_per_actor
    with contextlib.ExitStack() as ray_session:
        with timeline.phase("ray_start"):
            # Leave at least one CPU for the read tasks: a pool holding every CPU starves them.
            ray_session.enter_context(ray_connection(
                cfg.cluster.address, need + 1, p.num_actors if p.use_gpu else 0,
                f"{p.num_actors} actors x {p.cpus_per_actor} CPUs plus the reads",
                "lower predict.num_actors / predict.cpus_per_actor or add nodes",
                cfg.cluster.local_num_cpus))
        chunks = _chunks(plan.files, p.chunk_bytes)
        with timeline.phase("predict"):
            done = sum(_predict_or_skip(cfg, model, plan, chunk, f"{staging}/chunk-{i:05d}",
                                        f"{i + 1} of {len(chunks)}", console)
                       for i, chunk in enumerate(chunks))
        with timeline.phase("ray_stop"):
            ray_session.close()
    if done:
        console(f"resumed: {done} of {len(chunks)} input chunks were already predicted in {staging}")
    rows = _count_rows(staging)
    if rows != plan.rows:
        remove(staging)
        raise PipelineError(f"wrote {rows} rows for {plan.rows} input rows: nothing was "
                            "published; rerun the job")
    with timeline.phase("publish"):
        # The markers served the reruns; the published output holds predictions only.
        for info in fs.get_file_info(pafs.FileSelector(inner, recursive=True)):
            if info.base_name in (DONE_MARKER, RUN_FILE):
                fs.delete_file(info.path)
        output.publish()
    return rows


def _predict_or_skip(cfg: PredictJobConfig, model: ResolvedModel, plan: _Plan, chunk: list[str],
                     target: str, which: str, console) -> bool:
    """Predict one chunk into `target`, redoing it after a failure that is not the data's;
    True when an earlier attempt of the job had finished it already."""
    if _chunk_done(target, chunk):
        return True
    max_failures = cfg.predict.max_failures
    for attempt in range(max_failures + 1):
        try:
            _predict_chunk(cfg, model, plan, chunk, target)
            return False
        except Exception as exc:  # noqa: BLE001  (a lost actor or node: redo the chunk)
            error = user_error_in(exc)
            if error is not None:
                raise error from None  # the data's fault: the same on every attempt
            if attempt == max_failures:
                raise PipelineError(f"predicting chunk {which} failed {attempt + 1} times "
                                    f"({first_line(exc)}): rerun the same command to resume; "
                                    "see the Ray logs") from None
            console(f"chunk {which} failed ({type(exc).__name__}); predicting it again "
                    f"({attempt + 1} of {max_failures})")
    return False


def _chunks(files: list[str], chunk_bytes: int) -> list[list[str]]:
    """Consecutive groups of input files of about `chunk_bytes`: the unit a rerun can skip."""
    chunks: list[list[str]] = [[]]
    size = 0
    for path in files:
        fs, inner = filesystem(path)
        nbytes = fs.get_file_info(inner).size or 0
        if chunks[-1] and size + nbytes > chunk_bytes:
            chunks.append([])
            size = 0
        chunks[-1].append(path)
        size += nbytes
    return chunks


def _fingerprint(chunk: list[str]) -> list:
    """What a finished chunk was made from: paths, sizes and modification times."""
    out = []
    for path in chunk:
        fs, inner = filesystem(path)
        info = fs.get_file_info(inner)
        out.append([path, info.size, info.mtime_ns])
    return out


def _mark_done(target: str, chunk: list[str]) -> None:
    fs, inner = filesystem(target)
    with fs.open_output_stream(f"{inner}/{DONE_MARKER}") as fh:
        fh.write(json.dumps(_fingerprint(chunk)).encode())


def _chunk_done(target: str, chunk: list[str]) -> bool:
    """A chunk is skipped only if it finished from exactly the same input files."""
    fs, inner = filesystem(target)
    try:
        with fs.open_input_stream(f"{inner}/{DONE_MARKER}") as fh:
            return json.loads(fh.read()) == json.loads(json.dumps(_fingerprint(chunk)))
    except (FileNotFoundError, OSError, ValueError):
        return False


def _count_rows(path: str) -> int:
    fs, inner = filesystem(path)
    return sum(f.metadata.num_rows for f in pq.ParquetDataset(inner, filesystem=fs).fragments)

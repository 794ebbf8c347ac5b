"""Paths and outputs: one rule set for every command that writes, and one staged publish.

    out = Output("data/synth", "synth", overwrite=False, inputs={})   # checks, before any work
    with out.staged() as staging:                                      # a hidden sibling of out
        write(staging)
    # published: staging renamed to data/synth with its manifest (_lstm_pipeline.json)

The rules, checked before a command does any work:
- an output may not equal, sit inside or hold any of the command's inputs (predictions written
  into the shards they came from would become training rows; an `--overwrite` of a directory
  that holds the input would delete it), nor hold the working directory;
- an existing output is replaced only with `--overwrite`, and only when this project wrote it:
  its manifest names every file in it, so a directory that holds anything else (the user's
  notes, a database, another dataset) is refused, whatever the flag says;
- the output appears whole or not at all: it is written beside the target and renamed into
  place (on object storage, where nothing renames, each file is moved and the manifest, written
  last, marks the output complete).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import uuid
from typing import Iterable, Iterator, Mapping
from urllib.parse import urlparse

import pyarrow.fs as pafs

from pipeline.errors import OutputError

MANIFEST = "_lstm_pipeline.json"
"""Written at the root of every output: what wrote it and every file in it. `_` keeps it out of
Parquet readers (pyarrow, Ray Data and `list_shards` skip names starting with `_` or `.`)."""

GLOB_CHARS = "*?["


# --------------------------------------------------------------------------- paths


def is_uri(path: str) -> bool:
    return "://" in path and urlparse(path).scheme not in ("", "file")


def absolute(path: str) -> str:
    """Make a local path absolute (workers run in other directories); leave URIs alone."""
    if is_uri(path):
        return path
    if path.startswith("file://"):
        path = urlparse(path).path
    return os.path.abspath(os.path.expanduser(path))


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for a local path or a URI (s3://, gs://, ...)."""
    if is_uri(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), path


def exists(path: str) -> bool:
    fs, inner = filesystem(path)
    return fs.get_file_info(inner).type != pafs.FileType.NotFound


def _location(path: str) -> tuple[str, tuple[str, ...]]:
    """(store, path components) for comparing places: symlinks resolved on local disks, the
    non-wildcard prefix of a glob (what the pattern can match lies below it)."""
    if is_uri(path):
        parsed = urlparse(path)
        store, inner = f"{parsed.scheme}://{parsed.netloc}", parsed.path
    else:
        store, inner = "", absolute(path)
    parts = [p for p in inner.split("/") if p not in ("", ".")]
    for i, part in enumerate(parts):
        if any(ch in part for ch in GLOB_CHARS):
            parts = parts[:i]
            break
    if not store:
        return "", tuple(p for p in os.path.realpath("/" + "/".join(parts)).split("/") if p)
    return store, tuple(parts)


def relation(a: str, b: str) -> str | None:
    """'equal', 'inside' (a lies within b), 'above' (a holds b) or None (apart)."""
    (sa, pa_), (sb, pb) = _location(a), _location(b)
    if sa != sb:
        return None
    if pa_ == pb:
        return "equal"
    if pa_[:len(pb)] == pb:
        return "inside"
    if pb[:len(pa_)] == pa_:
        return "above"
    return None


def check_apart(outputs: Mapping[str, str], inputs: Mapping[str, str | Iterable[str]],
                replaces: bool = True) -> None:
    """Refuse an output that equals, sits inside or holds an input, or holds the working
    directory; the message names both paths and what to do. Keys name the paths in messages
    (`--output predictions/x`), values are the paths. `replaces=False`: the command only
    adds its own directory inside the output (Ray Train's run directory under
    train.storage_path), so an output that holds an input or the working directory is fine."""
    problems = []
    for out_name, out in outputs.items():
        if replaces and relation(out, os.getcwd()) in ("equal", "above"):
            problems.append(f"{out_name} is the working directory or holds it: write into a "
                            "new directory of its own, e.g. a subdirectory")
            continue
        for in_name, paths in inputs.items():
            for path in [paths] if isinstance(paths, str) else paths:
                rel = relation(out, path)
                if rel == "equal":
                    problems.append(f"{out_name} is the input {in_name} {path}: write the "
                                    "output somewhere else; the input would be replaced")
                elif rel == "inside":
                    problems.append(f"{out_name} is inside the input {in_name} {path}: "
                                    "choose a directory outside it; a later read of the input "
                                    "would take the output as data")
                elif rel == "above" and replaces:
                    problems.append(f"{out_name} holds the input {in_name} {path}: choose "
                                    "a directory that does not contain the input; replacing the "
                                    "output would delete it")
                else:
                    continue
                break
    if problems:
        raise OutputError(problems[0], problems)


def check_writable_dir(path: str, key: str) -> None:
    """Fail now, naming `key`, when `path` cannot be a directory this job writes into: it is a
    file, or (local) its nearest existing parent is not a writable directory."""
    fs, inner = filesystem(path)
    try:
        info = fs.get_file_info(inner)
    except OSError as exc:
        raise OutputError(f"{key} {path} cannot be reached ({str(exc).splitlines()[0]}): check the "
                          "URI and the storage credentials") from None
    if info.type == pafs.FileType.File:
        raise OutputError(f"{key} {path} is a file, not a directory: point it at a directory "
                          "(it is created when missing)")
    if is_uri(path):
        return
    parent = inner
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise OutputError(f"{key} {path} cannot be created: {parent} is a file; choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{key} {path} cannot be written: {parent} is not writable by this "
                          "user; choose another path or fix its permissions")


# --------------------------------------------------------------------------- ownership


def _list_files(fs: pafs.FileSystem, root: str) -> tuple[list[str], list[str]]:
    """(files, other entries) under `root`, relative to it; symlinks count as other."""
    files, other = [], []
    if isinstance(fs, pafs.LocalFileSystem):
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                full = os.path.join(dirpath, name)
                rel = os.path.relpath(full, root)
                if os.path.islink(full) or (name in filenames and not os.path.isfile(full)):
                    other.append(rel)
                elif name in filenames:
                    files.append(rel)
        return sorted(files), sorted(other)
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        if info.type == pafs.FileType.File:
            files.append(info.path[len(root.rstrip("/")) + 1:])
    return sorted(files), other


def read_manifest(path: str) -> dict | None:
    fs, inner = filesystem(path)
    try:
        with fs.open_input_stream(f"{inner.rstrip('/')}/{MANIFEST}") as fh:
            manifest = json.loads(fh.read())
    except (FileNotFoundError, OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("written_by") != "lstm-pipeline":
        return None
    return manifest


def foreign_entries(path: str) -> list[str]:
    """What lies in the directory `path` that its manifest does not name (everything, when it has
    no manifest); [] means this project wrote all of it."""
    fs, inner = filesystem(path)
    files, other = _list_files(fs, inner)
    manifest = read_manifest(path)
    ours = set(manifest.get("files", [])) | {MANIFEST} if manifest else set()
    return other + [f for f in files if f not in ours]


def check_replaceable(path: str, overwrite: bool, flag: str) -> bool:
    """Whether `path` exists (an empty directory counts as absent); raises when it may not be
    replaced: it exists without `overwrite`, or holds anything this project did not write."""
    fs, inner = filesystem(path)
    info = fs.get_file_info(inner)
    if info.type == pafs.FileType.NotFound:
        return False
    if info.type != pafs.FileType.Directory or (not is_uri(path) and os.path.islink(inner)):
        raise OutputError(f"{flag} {path} exists and is not a directory this project wrote: "
                          "choose another path")
    files, other = _list_files(fs, inner)
    if not files and not other:
        return False
    if not overwrite:
        raise OutputError(f"{flag} {path} already exists: pass --overwrite to replace it (allowed "
                          "only for an output lstm-pipeline wrote) or choose another path")
    foreign = foreign_entries(path)
    if foreign:
        why = ("it has no lstm-pipeline manifest" if read_manifest(path) is None
               else "the manifest lstm-pipeline wrote there does not name it")
        raise OutputError(f"{flag} {path} holds {foreign[0]}{' and more' if len(foreign) > 1 else ''}, "
                          f"which lstm-pipeline did not write ({why}): --overwrite replaces only "
                          "this project's outputs; choose another path or move those files away")
    return True


# --------------------------------------------------------------------------- staged output


class Output:
    """A directory a command creates: checked when made (before any work), written in a staging
    sibling, published whole. `staging_key` gives a deterministic staging name, so a rerun finds
    the work a crashed run left (batch predict resumes that way); otherwise each run stages
    afresh."""

    def __init__(self, target: str, kind: str, *, overwrite: bool = False,
                 inputs: Mapping[str, str | Iterable[str]] | None = None, flag: str = "--out",
                 staging_key: str | None = None):
        self.target = absolute(target).rstrip("/")
        self.kind, self.overwrite, self.flag = kind, overwrite, flag
        # Messages name the path as the user gave it, and where it resolved to.
        self.shown = self.target if target.rstrip("/") == self.target else f"{target} ({self.target})"
        check_apart({f"{flag} {self.shown}": self.target}, inputs or {})
        check_writable_dir(self.target.rsplit("/", 1)[0] or "/", f"the parent of {flag} {self.shown}")
        self.replaces = check_replaceable(self.target, overwrite, f"{flag} {self.shown}")
        self.stage_at(staging_key or uuid.uuid4().hex[:12])

    def stage_at(self, key: str) -> None:
        """Stage in the hidden sibling `.NAME.partial-KEY`."""
        parent, name = self.target.rsplit("/", 1)
        self.staging = f"{parent}/.{name}.partial-{key}"

    def prepare(self) -> str:
        fs, inner = filesystem(self.staging)
        fs.create_dir(inner, recursive=True)
        return self.staging

    def discard(self) -> None:
        remove(self.staging)

    @contextlib.contextmanager
    def staged(self) -> Iterator[str]:
        """Yield the staging directory; publish it when the block succeeds, remove it if not."""
        staging = self.prepare()
        try:
            yield staging
            self.publish()
        finally:
            if exists(self.staging):
                self.discard()

    def publish(self, extra: dict | None = None) -> None:
        """Write the manifest into the staging directory and move it into place, replacing the
        target (checked again: it may have changed while the work ran)."""
        fs, staging = filesystem(self.staging)
        files, _ = _list_files(fs, staging)
        manifest = {"written_by": "lstm-pipeline", "kind": self.kind,
                    "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                    "files": [f for f in files if f != MANIFEST]} | (extra or {})
        with fs.open_output_stream(f"{staging}/{MANIFEST}") as fh:
            fh.write(json.dumps(manifest, indent=1).encode())
        replaces = check_replaceable(self.target, self.overwrite, f"{self.flag} {self.shown}")
        _, target = filesystem(self.target)
        if isinstance(fs, pafs.LocalFileSystem):
            old = f"{self.staging}.old"
            if replaces:
                os.replace(target, old)
            elif os.path.isdir(target):
                os.rmdir(target)  # empty
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.replace(staging, target)
            if replaces:
                shutil.rmtree(old, ignore_errors=True)
            return
        # Object storage has no rename: remove what the old output's manifest names, move each
        # file, the manifest last (readers of a prefix see it complete once the manifest is there).
        if replaces:
            for rel in read_manifest(self.target)["files"] + [MANIFEST]:
                with contextlib.suppress(FileNotFoundError, OSError):
                    fs.delete_file(f"{target}/{rel}")
        for rel in [f for f in files if f != MANIFEST] + [MANIFEST]:
            fs.move(f"{staging}/{rel}", f"{target}/{rel}")
        remove(self.staging)


def remove(path: str) -> None:
    """Delete a directory this module staged (missing is fine)."""
    fs, inner = filesystem(path)
    if isinstance(fs, pafs.LocalFileSystem):
        shutil.rmtree(inner, ignore_errors=True)
    elif fs.get_file_info(inner).type != pafs.FileType.NotFound:
        fs.delete_dir(inner)

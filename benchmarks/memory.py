"""Memory: peak RSS of a training worker and of a predict actor at 1x and 8x the data.

    python benchmarks/memory.py                             # 10k and 80k sequences, T=100, F=16
    python benchmarks/memory.py --rows 1000 --val-rows 200 --length 20 --hidden 32 \\
        --epochs 1 --scale 4                                # a quick check

For each size, `run_training` (default config: 2 workers x 1 CPU) and then `run_prediction`
(1 actor) over the same training shards run in this process, which starts the local Ray: every
Ray process is then a descendant of this one. A thread polls them every `--interval` seconds
and keeps each process's peak RSS and the peaks of its parts from /proc/PID/status: private
(RssAnon: heap, tensors, Arrow buffers), file (RssFile: mapped files, mostly shared libraries)
and shmem (RssShmem: pages of the Ray object store, shared memory that is not the process's
own). Processes are told apart by Ray's process title: `ray::RayTrainWorker...` (training
workers) and `ray::MapWorker(...Predictor...)` (predict actors). Target: the peak at 8x within 10%
of the peak at 1x (ratio <= 1.10).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

KINDS = {"train worker": ("RayTrainWorker",), "predict actor": ("MapWorker", "Predictor")}


class Poller:
    """Peak RSS per process kind over this process's descendants, while active."""

    def __init__(self, interval: float):
        self.interval = interval
        self.peak: dict[str, dict[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *_):
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.is_set():
            for p in me.children(recursive=True):
                try:
                    title = " ".join(p.cmdline())
                    mem = _status(p.pid)
                except (psutil.Error, OSError, KeyError):
                    continue
                for kind, marks in KINDS.items():
                    if any(m in title for m in marks):
                        cur = self.peak.setdefault(kind, dict.fromkeys(MEASURES, 0))
                        for what in MEASURES:
                            cur[what] = max(cur[what], mem[what])
            self._stop.wait(self.interval)


MEASURES = ("rss", "private", "file", "shmem")


def _status(pid: int) -> dict[str, int]:
    """RSS and its parts from /proc (bytes): private (anonymous: heap, tensors, Arrow buffers),
    file (mapped files: shared libraries), shmem (shared memory: Ray object store pages)."""
    fields = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                fields[key] = int(value.split()[0]) * 1024
    return {"rss": fields["VmRSS"], "private": fields["RssAnon"], "file": fields["RssFile"],
            "shmem": fields["RssShmem"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_size_args(ap, epochs=2, rounds=1)
    ap.add_argument("--scale", type=int, default=8, help="the larger dataset is this many times --rows")
    ap.add_argument("--interval", type=float, default=0.2, help="seconds between RSS samples")
    args = ap.parse_args()

    from pipeline.config import PredictJobConfig, load_config
    from pipeline.predict import run_prediction

    work = common.workdir(args)
    base_rows, base_val = args.rows, args.val_rows
    peaks: dict[int, dict[str, dict[str, int]]] = {}
    for scale in (1, args.scale):
        args.rows, args.val_rows = base_rows * scale, base_val * scale
        data = common.write_data(os.path.join(work, f"data-{scale}x"), args)
        with Poller(args.interval) as poll:
            res = common.run_pipeline(data, work, args, [f"data.batch_size={args.batch // 2}"])
            cfg = load_config(PredictJobConfig, None, [
                f"predict.model={res['model_uri']}", f"predict.input_path={data}/train",
                f"predict.output_path={work}/pred-{scale}x", "predict.overwrite=true",
                f"tracking.tracking_uri={res['tracking_uri']}"])
            run_prediction(cfg, console=lambda _: None)
        peaks[scale] = poll.peak
        print(f"{scale}x ({args.rows} sequences): " + "  ".join(
            f"{k} peak RSS {v['rss'] / 2**20:.0f} MiB (private {v['private'] / 2**20:.0f}, "
            f"file {v['file'] / 2**20:.0f}, shmem {v['shmem'] / 2**20:.0f} MiB)"
            for k, v in poll.peak.items()), flush=True)

    print()
    rows, verdicts = [], []
    for kind in KINDS:
        small, big = peaks[1].get(kind), peaks[args.scale].get(kind)
        if not small or not big:
            rows.append([kind, "not seen", "", "", ""])
            continue
        for what in MEASURES:
            ratio = big[what] / small[what] if small[what] else float("inf")  # e.g. no shmem at 1x
            rows.append([kind, what, f"{small[what] / 2**20:.0f}", f"{big[what] / 2**20:.0f}",
                         f"{ratio:.2f}"])
            if what in ("file", "shmem"):
                continue  # parts shown for the explanation; the targets are on RSS and private
            verdicts.append(f"target {kind} peak {what} {args.scale}x/1x <= 1.10: {ratio:.2f}  "
                            f"{common.verdict(ratio, 1.10, higher=False)}")
    print(common.table(rows, ["process", "measure", "1x MiB", f"{args.scale}x MiB", "ratio"]))
    print()
    print("\n".join(verdicts))


if __name__ == "__main__":
    main()

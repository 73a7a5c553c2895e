"""Benchmark: ``maskrcnn predict`` on a folder of images in one process against N processes.

    .venv/bin/python benchmarks/ranks.py --out bench_out            # 16 images of 512 x 512, 2 processes

The same command (built-in ``nuclei`` model, ``--device cpu``) over one folder of synthetic
fluorescence scenes: once in one process with every core as its threads, once as
``torchrun --nproc-per-node N`` launches it (the environment torchrun gives each rank; each rank
takes its share of the cores, maskrcnn.prediction.ranks). Wall-clock time of the whole command,
model loading included, best of ``--repeats``; the output folders are compared file by file.

Output: a table on stdout and <out>/ranks.md, <out>/ranks.json with the machine and the date.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import machine  # noqa: E402

WORKER = "import sys; from maskrcnn.cli.main import main; sys.exit(main(sys.argv[1:]))"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(processes: int, argv: list[str], threads: int) -> float:
    """Seconds for ``maskrcnn ARGV`` in ``processes`` ranks (one process: a plain run with ``threads``)."""
    port, procs = free_port(), []
    start = time.perf_counter()
    for rank in range(processes):
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        if processes > 1:
            env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(processes), OMP_NUM_THREADS="1",
                       LOCAL_WORLD_SIZE=str(processes), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER, *argv], env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True))
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode:
            sys.exit(f"a run failed: {err}")
    return time.perf_counter() - start


def same_files(a: Path, b: Path) -> bool:
    names = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    return names == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file()) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench_out")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    from maskrcnn.data.synthetic_scenes import synth_scene
    from maskrcnn.data.writers import write_image

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        for i in range(args.images):
            write_image(folder / f"scene{i:02d}.png", synth_scene(args.size, np.random.default_rng([7, i]))[0])
        common = ["predict", str(folder), "--weights", "nuclei", "--device", "cpu", "--no-progress"]
        times = {1: [], args.processes: []}
        for repeat in range(args.repeats):  # alternate, so that drifting load hits both alike
            for n in (1, args.processes) if repeat % 2 == 0 else (args.processes, 1):
                times[n].append(run(n, [*common, "--out", str(Path(tmp) / f"out{n}")], cores))
        identical = same_files(Path(tmp) / "out1", Path(tmp) / f"out{args.processes}")
    one, many = min(times[1]), min(times[args.processes])
    report = dict(machine=machine(), images=args.images, size=args.size, processes=args.processes, cores=cores,
                  seconds={"1 process": one, f"{args.processes} processes": many}, ratio=many / one,
                  identical_outputs=identical, repeats=times)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ranks.json").write_text(json.dumps(report, indent=1, default=str))
    text = (f"| predict, {args.images} images of {args.size}x{args.size} | wall s (best of {args.repeats}) | "
            f"images/s |\n|---|---:|---:|\n"
            f"| 1 process, {cores} threads | {one:.1f} | {args.images / one:.2f} |\n"
            f"| {args.processes} processes (torchrun), {max(1, cores // args.processes)} thread(s) each | "
            f"{many:.1f} | {args.images / many:.2f} |\n\n"
            f"{args.processes} processes take {many / one:.2f}x the time of 1; outputs identical: {identical}. "
            f"{report['machine']['date']}, {report['machine']['cpu']}, {cores} cores.\n")
    (out / "ranks.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

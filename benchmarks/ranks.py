"""Benchmark: ``maskrcnn predict`` on a folder of images in one process against N processes.

    .venv/bin/python benchmarks/ranks.py --out bench_out   # 16 images of 512, one of 4096 streamed; 2 processes

The same command (built-in ``nuclei`` model, ``--device cpu``) over one folder of synthetic
fluorescence scenes: once in one process with every core as its threads, once as
``torchrun --nproc-per-node N`` launches it (the environment torchrun gives each rank; each rank
takes its share of the cores, maskrcnn.prediction.ranks). Wall-clock time of the whole command,
model loading included, best of ``--repeats``; the output folders are compared file by file. Then
one image too large for the default ``--max-memory`` (4096 x 4096: streamed in tiles), whose tiles
the ranks segment together (maskrcnn.prediction.streaming).

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


def timed(argv: list[str], out: Path, processes: int, repeats: int, cores: int) -> tuple[float, float, bool]:
    """Best wall-clock seconds of ``maskrcnn ARGV --out ...`` in 1 process and in ``processes``, and
    whether both wrote the same files."""
    times = {1: [], processes: []}
    for repeat in range(repeats):  # alternate, so that drifting load hits both alike
        for n in (1, processes) if repeat % 2 == 0 else (processes, 1):
            times[n].append(run(n, [*argv, "--out", str(out / f"out{n}")], cores))
    return min(times[1]), min(times[processes]), same_files(out / "out1", out / f"out{processes}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench_out")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--stream-size", type=int, default=4096, help="side of the one streamed image (0: none)")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    from maskrcnn.data.synthetic_scenes import synth_scene
    from maskrcnn.data.writers import write_image

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    common = ["--weights", "nuclei", "--device", "cpu", "--no-progress"]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        for i in range(args.images):
            write_image(folder / f"scene{i:02d}.png", synth_scene(args.size, np.random.default_rng([7, i]))[0])
        rows[f"{args.images} images of {args.size}x{args.size}"] = (args.images, *timed(
            ["predict", str(folder), *common], Path(tmp) / "folder", args.processes, args.repeats, cores))
        if args.stream_size:
            large = Path(tmp) / "large.tif"  # over the default --max-memory (2 GB): streamed in tiles
            write_image(large, synth_scene(args.stream_size, np.random.default_rng([7, 99]))[0])
            rows[f"1 image of {args.stream_size}x{args.stream_size}, streamed"] = (1, *timed(
                ["predict", str(large), *common], Path(tmp) / "large", args.processes, args.repeats, cores))
    report = dict(machine=machine(), processes=args.processes, cores=cores, repeats=args.repeats,
                  rows={name: dict(images=n, one=one, many=many, ratio=many / one, identical_outputs=same)
                        for name, (n, one, many, same) in rows.items()})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ranks.json").write_text(json.dumps(report, indent=1, default=str))
    threads = max(1, cores // args.processes)
    text = (f"| predict (wall s, best of {args.repeats}) | 1 process, {cores} threads | {args.processes} processes "
            f"(torchrun), {threads} thread(s) each | ratio | outputs identical |\n|---|---:|---:|---:|---|\n")
    text += "".join(f"| {name} | {one:.1f} | {many:.1f} | {many / one:.2f} | {same} |\n"
                    for name, (n, one, many, same) in rows.items())
    text += f"\n{report['machine']['date']}, {report['machine']['cpu']}, {cores} cores.\n"
    (out / "ranks.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

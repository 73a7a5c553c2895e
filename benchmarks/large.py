"""Large and dense images: prediction time and peak memory of the microscopy model at 1024..4096.

Each measurement runs in a fresh child process (peak RSS via VmHWM, as in run.py), on a synthetic
nuclei image from ``maskrcnn.data.synthetic`` at a fixed density (about 120 nuclei per megapixel),
through the same path as ``maskrcnn predict`` (``Predictor``; tiled with ``--tile 1024 --overlap 128``
or whole); the time is the faster of two runs, the peak covers both. The dense row is a 2048 x 2048 image with 2000+ nuclei, predicted whole.

A random-weight model finds nothing (or, with zero thresholds, always its full cap), so neither its
detection count nor its time scales with the image. These rows use a trained nuclei model: the
``--weights`` checkpoint, else one of the CLI's default layout (``nuclei_config``: p2 at stride 4)
trained here for ``QUICK_TRAIN_STEPS`` steps on synthetic nuclei (about three minutes). The demo's
model is not used: it keeps the spec's stride-2 p2, about 4x the cost per pixel. The rows report how many of the
placed nuclei it found (mask IoU >= 0.5), so a capped or missing detection shows.

The slide rows (:func:`bench_slides`) run ``maskrcnn predict --weights nuclei`` with default flags
(``--max-memory 2G``) as a user would, in a child process, and report its peak RSS (``os.wait4``'s
``ru_maxrss`` of that child: the whole process, torch included) and wall time: a 6048 x 6048 PNG
(decoded, then streamed in tiles) and a 20,000 x 20,000 tiled BigTIFF read lazily region by region
(with the ``slides`` extra). Both images are mosaics of a few synthetic scenes
(``maskrcnn.data.synthetic_scenes``, nuclei about 20 px across); the TIFF is written tile by tile from
a generator, so making it stays small too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

DENSITY_PER_MP = 120
DENSE_SIZE, DENSE_NUCLEI = 2048, 2200
TILE, OVERLAP = 1024, 128
QUICK_TRAIN_STEPS = 150
REPEATS = 2  # seconds: the faster of two runs (one-off interference from other processes)

# (label, image size, nuclei placed, tile or None)
CASES = [
    ("whole", 1024, None, None),
    ("whole", 2048, None, None),
    ("tiled", 1024, None, TILE),
    ("tiled", 2048, None, TILE),
    ("tiled", 4096, None, TILE),
    ("dense, whole", DENSE_SIZE, DENSE_NUCLEI, None),
]


def nuclei_image(size: int, nuclei: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    from maskrcnn.data.synthetic import synth_nuclei

    rng = np.random.default_rng([seed, size, nuclei])
    # smaller nuclei where they are packed densely, so 2000+ fit on 2048 x 2048 without hiding each other
    diameters = (6.0, 30.0) if nuclei / (size * size / 1e6) > 2 * DENSITY_PER_MP else (6.0, 60.0)
    return synth_nuclei(size, rng, n_range=(nuclei, nuclei), diameter_range=diameters, touch_fraction=0.2)


def found_fraction(label_image: torch.Tensor, truth: np.ndarray) -> float:
    """Fraction of the truth instances matched by a predicted one with mask IoU >= 0.5 (the
    pair's intersection counted from the joint histogram of the two label images)."""
    pred = label_image.numpy().astype(np.int64).ravel()
    true = truth.astype(np.int64).ravel()
    n_pred, n_true = int(pred.max()) + 1, int(true.max()) + 1
    joint = np.bincount(pred * n_true + true, minlength=n_pred * n_true).reshape(n_pred, n_true)
    area_p, area_t = joint.sum(1), joint.sum(0)
    inter = joint[1:, 1:]
    union = area_p[1:, None] + area_t[None, 1:] - inter
    iou = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
    if n_true <= 1:
        return 1.0
    return float((iou.max(axis=0) >= 0.5).mean()) if n_pred > 1 else 0.0


def child(spec: dict) -> dict:
    """In the child: one prediction of one synthetic image; time and peak RSS increase."""
    from run import _reset_peak, _status_kb  # the same VmHWM method as the main table

    from maskrcnn.prediction.predict import Predictor

    torch.set_num_threads(spec["threads"])
    image, truth = nuclei_image(spec["size"], spec["nuclei"])
    predictor = Predictor.from_checkpoint(spec["weights"], "cpu")
    normalized = predictor.normalizer(image)
    warm, _ = nuclei_image(256, 10, seed=1)  # load kernels and allocator pools outside the measurement
    predictor(warm)
    _reset_peak()
    before = _status_kb("VmRSS")
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        result = predictor.predict_normalized(normalized, spec["tile"], OVERLAP)
        times.append(time.perf_counter() - start)
    peak_mb = (_status_kb("VmHWM") - before) / 1024
    return {"seconds": min(times), "times_s": times, "peak_mb": peak_mb, "instances_placed": int(truth.max()),
            "instances_predicted": len(result), "found": found_fraction(result.label_image, truth)}


def measure(size: int, nuclei: int, tile: int | None, weights: Path) -> dict:
    spec = {"size": size, "nuclei": nuclei, "tile": tile, "weights": str(weights),
            "threads": torch.get_num_threads()}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env,
                          capture_output=True, text=True, cwd=Path(__file__).parent)
    if proc.returncode != 0:
        raise RuntimeError(f"large-image child failed ({spec}): {proc.stderr.strip()[-800:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def quick_model(out: Path) -> Path:
    """A nuclei model trained here on synthetic nuclei (when no checkpoint is given)."""
    from maskrcnn.presets import nuclei_config
    from maskrcnn.data.synthetic import write_synthetic_dataset
    from maskrcnn.train import TrainOptions, train

    data = out / "large_model_data"
    if not data.exists():
        write_synthetic_dataset(data, 24, 256, seed=0)
    opts = TrainOptions(data=str(data), out=str(out / "large_model"), format="labels", config=nuclei_config(),
                        iters=QUICK_TRAIN_STEPS, val_fraction=0.0, warmup_iters=30, progress=False,
                        device="cpu")
    return train(opts).last


def bench_large(out: Path, weights: Path | None, log) -> dict:
    if weights is None:
        log(f"large images: no checkpoint given; training a nuclei_config model for {QUICK_TRAIN_STEPS} steps")
        weights = quick_model(out).resolve()
    rows = []
    for label, size, nuclei, tile in CASES:
        nuclei = nuclei or round(DENSITY_PER_MP * size * size / 1e6)
        log(f"large images: {size}x{size}, {nuclei} nuclei, {label}")
        rows.append({"case": label, "size": size, "tile": tile, **measure(size, nuclei, tile, weights)})
    return {"weights": str(weights), "tile": TILE, "overlap": OVERLAP, "density_per_mp": DENSITY_PER_MP,
            "rows": rows, "area_scaling": area_scaling(rows), "slides": bench_slides(out, log)}


def area_scaling(rows: list[dict]) -> dict:
    """Time per megapixel of each size relative to the smallest, per mode (1.0 = linear in area)."""
    scaling = {}
    for mode in ("whole", "tiled"):
        mine = sorted((r for r in rows if r["case"] == mode), key=lambda r: r["size"])
        if len(mine) > 1:
            base = mine[0]["seconds"] / mine[0]["size"] ** 2
            scaling[mode] = {r["size"]: (r["seconds"] / r["size"] ** 2) / base for r in mine}
    return scaling


SLIDE_CASES = [("png", 6048), ("tiff", 20000)]  # (format, side)
SCENE_SIDE, SCENES, MOSAIC_TILE = 1024, 4, 512


def scene_blocks(seed: int = 0) -> list[np.ndarray]:
    """SCENES synthetic 8-bit scenes of SCENE_SIDE pixels (nuclei about 20 px across, 30% cover)."""
    import dataclasses

    from maskrcnn.data.synthetic_scenes import Scene, synth_scene

    rng = np.random.default_rng(seed)
    scenes = []
    for _ in range(SCENES):
        scene = dataclasses.replace(Scene.draw(rng), diameter=20.0, coverage=0.3, bits=8, vignetting=0.0)
        scenes.append(synth_scene(SCENE_SIDE, rng, scene)[0])
    return scenes


def mosaic_tile(scenes: list[np.ndarray], ty: int, tx: int) -> np.ndarray:
    """Tile (ty, tx) of MOSAIC_TILE pixels of the endless mosaic of ``scenes`` (a fixed pattern)."""
    per = SCENE_SIDE // MOSAIC_TILE
    scene = scenes[(ty // per + 3 * (tx // per)) % len(scenes)]
    y0, x0 = (ty % per) * MOSAIC_TILE, (tx % per) * MOSAIC_TILE
    return scene[y0:y0 + MOSAIC_TILE, x0:x0 + MOSAIC_TILE]


def write_mosaic(path: Path, side: int, scenes: list[np.ndarray]) -> None:
    """A side x side mosaic: PNG (assembled in memory: side**2 bytes) or tiled BigTIFF (tile by tile)."""
    import tifffile
    from PIL import Image

    count = -(-side // MOSAIC_TILE)
    if path.suffix == ".png":
        rows = [np.concatenate([mosaic_tile(scenes, ty, tx) for tx in range(count)], axis=1) for ty in range(count)]
        Image.fromarray(np.concatenate(rows)[:side, :side]).save(path)
        return
    tiles = (mosaic_tile(scenes, ty, tx) for ty in range(count) for tx in range(count))
    tifffile.imwrite(path, tiles, shape=(side, side), dtype=np.uint8, tile=(MOSAIC_TILE, MOSAIC_TILE),
                     bigtiff=True, compression="zlib", photometric="minisblack")


def bench_slides(out: Path, log) -> list[dict]:
    """The slide rows (see the module docstring)."""
    scenes = scene_blocks()
    rows = []
    for kind, side in SLIDE_CASES:
        image = out / f"mosaic_{side}.{kind}"
        if not image.exists():
            log(f"slides: writing {image}")
            write_mosaic(image, side, scenes)
        log(f"slides: maskrcnn predict {image.name} --weights nuclei (default --max-memory 2G)")
        rows.append({"image": image.name, "side": side, **run_measured(image, out / f"slides_{side}")})
    return rows


def run_measured(image: Path, out: Path) -> dict:
    """``maskrcnn predict IMAGE --weights nuclei`` with default flags in a child process: wall time,
    peak RSS from os.wait4 (that child alone) and the instances its table lists."""
    command = [sys.executable, "-m", "maskrcnn", "predict", str(image), "--weights", "nuclei", "--out", str(out),
               "--no-progress"]
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    stderr = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    if status != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({status}): {stderr.strip()[-800:]}")
    with open(out / f"{image.stem}_instances.csv") as table:
        instances = sum(1 for _ in table) - 1
    return {"seconds": seconds, "peak_mb": usage.ru_maxrss / 1024, "instances": instances}


def markdown(large: dict) -> list[str]:
    lines = ["", f"Large images (`benchmarks/large.py`; weights `{large['weights']}`; tiles "
             f"{large['tile']} / overlap {large['overlap']}; {large['density_per_mp']} nuclei per megapixel "
             "except the dense row):", "",
             "| image | mode | nuclei placed | predicted | found (IoU >= 0.5) | seconds | s / MP | peak MB |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in large["rows"]:
        mp = r["size"] ** 2 / 1e6
        lines.append(f"| {r['size']}x{r['size']} | {r['case']} | {r['instances_placed']} | "
                     f"{r['instances_predicted']} | {r['found']:.2f} | {r['seconds']:.1f} | "
                     f"{r['seconds'] / mp:.2f} | {r['peak_mb']:.0f} |")
    if large.get("slides"):
        lines += ["", "Slide-sized images, `maskrcnn predict IMAGE --weights nuclei` with default flags "
                      "(`--max-memory 2G`), whole process:", "",
                  "| image | instances | seconds | peak RSS MB |", "|---|---:|---:|---:|"]
        lines += [f"| {r['image']} ({r['side']} x {r['side']}) | {r['instances']} | {r['seconds']:.0f} | "
                  f"{r['peak_mb']:.0f} |" for r in large["slides"]]
    for mode, ratios in large["area_scaling"].items():
        lines.append("")
        lines.append(f"Time per megapixel relative to the smallest ({mode}): "
                     + ", ".join(f"{size}: {ratio:.2f}x" for size, ratio in ratios.items()))
    return lines


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--child":
    print(json.dumps(child(json.loads(sys.argv[2]))))
elif __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--slides":
    # the slide rows alone: python benchmarks/large.py --slides OUT
    folder = Path(sys.argv[2])
    folder.mkdir(parents=True, exist_ok=True)
    slides = bench_slides(folder, lambda line: print(line, file=sys.stderr, flush=True))
    print(json.dumps(slides))
    print("\n".join(markdown({"weights": "nuclei", "tile": TILE, "overlap": OVERLAP, "density_per_mp": DENSITY_PER_MP,
                               "rows": [], "area_scaling": {}, "slides": slides})))

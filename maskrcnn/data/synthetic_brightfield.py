"""Synthetic brightfield slides (H&E, IHC, plain brightfield): the training data of the built-in ``he`` model.

A slide is drawn as what it physically is: optical densities of haematoxylin, eosin and DAB
(maskrcnn.data.stains) photographed in transmitted light. Nuclei reuse the fluorescence scenes'
outlines (maskrcnn.data.synthetic_scenes: sizes, crowding, touching and overlapping, elongated and
kidney shapes) and are drawn dark with haematoxylin: chromatin texture, vesicular nuclei with a
darker rim or uniformly hyperchromatic ones, nucleoli. Around them, what a detector must leave
out: eosin cytoplasm and stroma with fibres, white lumen and fat vacuoles, red blood cells (eosin
discs with a pale centre, in clusters), and on IHC slides DAB in positive nuclei, membranes and
cytoplasm. Between slides the stain vectors, strengths and white balance vary; the photograph
adds blur, noise and JPEG artefacts; a tenth of the slides are plain gray brightfield.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, replace

import numpy as np

from .stains import STAIN_VECTORS, stains_to_rgb
from .synthetic import _gaussian_blur, _largest_pieces, _relabel, _smooth_field
from .synthetic_scenes import A, ANGLE, B, CX, CY, Scene, SceneReader, _draw_nuclei, _unit_noise, rasterise_shapes

H, E, D = range(3)  # stain channels of a density map
KINDS = ("he", "ihc", "plain")


@dataclass(frozen=True)
class Slide:
    """What one brightfield image shows; every field is a per-image setting (:meth:`draw`)."""

    nuclei: Scene  # outlines and crowding of the nuclei (the fluorescence scenes' geometry)
    kind: str  # "he", "ihc" (haematoxylin counterstain and DAB) or "plain" (gray brightfield)
    haematoxylin: float  # density of the darkest nuclei
    cytoplasm: float  # haematoxylin of cytoplasm and stroma, fraction of the nuclei's
    vesicular: float  # fraction of nuclei with pale centre and dark rim (the rest hyperchromatic)
    eosin: float  # density of cytoplasm and stroma
    lumen: float  # fraction of the image that is white (lumen, background)
    fat: int  # white vacuoles per 256 x 256 pixels
    fibres: int  # stroma fibres per 256 x 256 pixels
    red_cells: int  # red blood cells per 256 x 256 pixels
    dab_nuclei: float  # IHC: fraction of nuclei DAB-positive
    dab_membrane: float  # IHC: density of DAB on membranes and cytoplasm around positive nuclei
    dab_tissue: float  # IHC: density of DAB in a cytoplasm and membrane network over the tissue
    dab: float  # IHC: density of DAB in positive nuclei
    stain_jitter: float  # sigma of the change of each stain vector from the standard ones
    blur: float  # optical blur sigma, pixels
    noise: float  # Gaussian noise sigma, fraction of full range
    jpeg: int  # JPEG quality, 0 for none

    @classmethod
    def draw(cls, rng: np.random.Generator) -> "Slide":
        def log_uniform(low: float, high: float) -> float:
            return float(np.exp(rng.uniform(np.log(low), np.log(high))))

        kind = str(rng.choice(KINDS, p=[0.55, 0.35, 0.10]))
        nuclei = replace(Scene.draw(rng), diameter=log_uniform(8.0, 45.0), coverage=rng.uniform(0.08, 0.6),
                         touch_fraction=rng.uniform(0.2, 0.8), condensed_fraction=rng.uniform(0.0, 0.1),
                         defocus_fraction=rng.uniform(0.0, 0.15), dynamic_range=log_uniform(1.3, 4.0),
                         debris=0)
        ihc = kind == "ihc"
        return cls(
            nuclei=nuclei, kind=kind, haematoxylin=rng.uniform(0.3, 1.1) * (0.7 if ihc else 1.0),
            cytoplasm=rng.uniform(0.05, 0.35),
            vesicular=rng.uniform(0.0, 1.0), eosin=rng.uniform(0.0, 0.08) if ihc else rng.uniform(0.08, 0.5),
            lumen=rng.choice([rng.uniform(0.0, 0.05), rng.uniform(0.0, 0.25)]), fat=int(rng.integers(0, 4)), fibres=int(rng.integers(0, 40)),
            red_cells=int(rng.choice([0, rng.integers(1, 60)])),
            dab_nuclei=rng.uniform(0.0, 0.7) if ihc else 0.0, dab_membrane=rng.uniform(0.0, 0.5) if ihc else 0.0,
            dab_tissue=rng.choice([0.0, rng.uniform(0.1, 0.8)]) if ihc else 0.0,
            dab=rng.uniform(0.2, 1.0), stain_jitter=rng.uniform(0.0, 0.08), blur=rng.uniform(0.4, 1.4),
            noise=log_uniform(0.003, 0.02), jpeg=int(rng.choice([0, rng.integers(55, 96)], p=[0.3, 0.7])))


def synth_slide(size: int | tuple[int, int], rng: np.random.Generator,
                slide: Slide | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One brightfield image (drawn from ``rng`` when ``slide`` is None).

    Returns image (H, W, 3) uint8 RGB, or (H, W) uint8 for plain brightfield, and labels (H, W)
    int32 with ids 1..N of the nuclei (red cells, vacuoles and DAB membranes are not labelled).
    """
    slide = slide or Slide.draw(rng)
    density, labels = slide_densities(size, slide, rng)
    return photograph(density, slide, rng), labels


def slide_densities(size: int | tuple[int, int], slide: Slide,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) float32 densities of haematoxylin, eosin and DAB, and the nuclei's labels (H, W) int32."""
    shape = (size, size) if isinstance(size, int) else tuple(size)
    field = _unit_noise(shape, rng, max(8.0, min(shape) / 6))
    lumen = field < np.quantile(field, slide.lumen)
    lumen |= _vacuoles(slide, shape, rng)
    labels, radius, nuclei = _nuclei(slide, shape, lumen, rng)
    density = np.zeros((*shape, 3), np.float32)
    density[..., H] = _haematoxylin(slide, labels, radius, nuclei, rng)
    density[..., E] = _eosin(slide, labels > 0, rng)
    density[..., H] += slide.cytoplasm * slide.haematoxylin * _smooth_field(shape, rng, 0.3, 1.0)  # bluish cytoplasm
    density[lumen & (labels == 0)] *= rng.uniform(0.0, 0.15)  # lumen and fat: nearly unstained
    density[..., E] += _red_cells(slide, shape, rng)
    if slide.kind == "ihc":
        _add_dab(density, slide, labels, rng)
    return density, labels.astype(np.int32)


def _vacuoles(slide: Slide, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Round white fat vacuoles, 2-6 nuclei across."""
    count = rng.poisson(slide.fat * shape[0] * shape[1] / 256**2)
    shapes = np.zeros((count, 17))
    shapes[:, [CY, CX]] = rng.uniform(0, 1, (count, 2)) * shape
    shapes[:, A] = slide.nuclei.diameter * rng.uniform(1.0, 3.0, count)
    shapes[:, B] = shapes[:, A] * rng.uniform(0.75, 1.0, count)
    shapes[:, ANGLE] = rng.uniform(0, np.pi, count)
    return rasterise_shapes(shapes, shape)[0] > 0


def _nuclei(slide: Slide, shape: tuple[int, int], lumen: np.ndarray,
            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels (H, W), squared normalised radius (H, W) and shape rows of the nuclei, none centred in lumen."""
    shapes = _draw_nuclei(slide.nuclei, shape, rng)
    rows = np.clip(shapes[:, CY].astype(int), 0, shape[0] - 1)
    cols = np.clip(shapes[:, CX].astype(int), 0, shape[1] - 1)
    shapes = shapes[~lumen[rows, cols]]
    if len(shapes) == 0:  # all in lumen: a slide with no nucleus
        return np.zeros(shape, np.int64), np.ones(shape, np.float32), shapes
    labels, radius = rasterise_shapes(shapes, shape)
    pieces = _largest_pieces(labels)
    min_pixels = max(8, int(0.05 * slide.nuclei.diameter**2))
    counts = np.bincount(pieces.reshape(-1), minlength=len(shapes) + 1)[1:]
    return _relabel(pieces, min_pixels), radius, shapes[counts >= min_pixels]


def _haematoxylin(slide: Slide, labels: np.ndarray, radius: np.ndarray, nuclei: np.ndarray,
                  rng: np.random.Generator) -> np.ndarray:
    """Nuclear haematoxylin: per-nucleus strength, rim or uniform profile, chromatin, nucleoli."""
    shape, count = labels.shape, len(nuclei)
    strength = np.r_[0.0, slide.haematoxylin * np.exp(rng.uniform(-np.log(slide.nuclei.dynamic_range), 0, count))]
    rim = np.r_[False, rng.uniform(size=count) < slide.vesicular]
    profile = np.where(rim[labels], 0.6 + 0.5 * radius**2, 1.0 - 0.15 * radius**2)
    texture = slide.nuclei.texture * (0.6 * _unit_noise(shape, rng, max(1.0, slide.nuclei.diameter / 10))
                                      + 0.4 * _unit_noise(shape, rng, 0.7))
    spots = _gaussian_blur((rng.uniform(size=shape) < slide.nuclei.nucleoli / 150).astype(np.float32),
                           max(0.8, slide.nuclei.diameter / 20))
    spots /= max(float(spots.max()), 1e-6)
    body = strength[labels] * profile * np.clip(1 + texture + 0.8 * spots, 0.2, None)
    return _gaussian_blur(body.astype(np.float32), 0.6)


def _eosin(slide: Slide, nuclear: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Cytoplasm (denser around nuclei) and stroma with fibres."""
    shape = nuclear.shape
    cytoplasm = _gaussian_blur(nuclear.astype(np.float32), max(1.5, 0.4 * slide.nuclei.diameter))
    field = slide.eosin * (0.5 * _smooth_field(shape, rng, 0.3, 1.2) + 0.8 * np.clip(cytoplasm * 2, 0, 1))
    count = rng.poisson(slide.fibres * shape[0] * shape[1] / 256**2)
    if count:
        fibres = np.zeros((count, 17))
        fibres[:, [CY, CX]] = rng.uniform(0, 1, (count, 2)) * shape
        fibres[:, A] = rng.uniform(10, 60, count)
        fibres[:, B] = rng.uniform(0.6, 2.0, count)
        fibres[:, ANGLE] = rng.normal(rng.uniform(0, np.pi), 0.3, count)  # stroma runs one way
        marks = rasterise_shapes(fibres, shape)[0] > 0
        field = field + _gaussian_blur(marks.astype(np.float32), 0.8) * rng.uniform(0.1, 0.4)
    return field.astype(np.float32)


def _red_cells(slide: Slide, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Eosin of red blood cells: discs about 0.7 nucleus across, pale centre, in a few clusters."""
    count = rng.poisson(slide.red_cells * shape[0] * shape[1] / 256**2)
    if count == 0:
        return np.zeros(shape, np.float32)
    centres = rng.uniform(0, 1, (max(1, count // 10), 2)) * shape
    cells = np.zeros((count, 17))
    cells[:, [CY, CX]] = centres[rng.integers(0, len(centres), count)] + rng.normal(0, 3 * slide.nuclei.diameter,
                                                                                       (count, 2))
    cells[:, A] = 0.35 * slide.nuclei.diameter * rng.uniform(0.8, 1.1, count)
    cells[:, B] = cells[:, A] * rng.uniform(0.6, 1.0, count)
    cells[:, ANGLE] = rng.uniform(0, np.pi, count)
    marks, radius = rasterise_shapes(cells, shape)
    disc = np.where(marks > 0, rng.uniform(0.5, 1.3) * (0.65 + 0.35 * radius), 0.0)
    return _gaussian_blur(disc.astype(np.float32), 0.6)


def _add_dab(density: np.ndarray, slide: Slide, labels: np.ndarray, rng: np.random.Generator) -> None:
    """DAB in positive nuclei (their haematoxylin weaker) and on the membrane and cytoplasm around them."""
    positive = np.r_[False, rng.uniform(size=labels.max()) < slide.dab_nuclei]
    inside = positive[labels]
    density[..., D] += np.where(inside, slide.dab * rng.uniform(0.6, 1.0), 0.0).astype(np.float32)
    density[..., H] *= np.where(inside, rng.uniform(0.3, 0.8), 1.0).astype(np.float32)
    around = _gaussian_blur(inside.astype(np.float32), max(1.5, 0.5 * slide.nuclei.diameter))
    membrane = (around > 0.08) & (around < 0.2) & (labels == 0)
    halo = np.where(labels == 0, np.clip(around * 3, 0, 1), 0.0) * rng.uniform(0.0, 0.5)
    density[..., D] += slide.dab_membrane * _gaussian_blur((membrane + halo).astype(np.float32), 0.8)
    # stained cytoplasm with membranes between cells: the zero crossings of band-passed noise make a net
    net = np.exp(-(_unit_noise(labels.shape, rng, max(1.0, 0.3 * slide.nuclei.diameter)) / 0.3) ** 2)
    tissue = _smooth_field(labels.shape, rng, 0.0, 1.0) * (0.4 + net)
    density[..., D] += slide.dab_tissue * np.where(labels == 0, tissue, 0.2 * tissue).astype(np.float32)


def photograph(density: np.ndarray, slide: Slide, rng: np.random.Generator) -> np.ndarray:
    """Densities -> the camera's uint8 image: jittered stain vectors, white balance and vignetting,
    blur, noise, JPEG; (H, W) gray for plain brightfield slides, else (H, W, 3) RGB."""
    vectors = np.abs(STAIN_VECTORS + rng.normal(0, slide.stain_jitter, (3, 3)))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True) / np.linalg.norm(STAIN_VECTORS, axis=1, keepdims=True)
    white = rng.uniform(0.85, 1.0) * rng.uniform(0.95, 1.0, 3)
    light = _smooth_field(density.shape[:2], rng, 0.9, 1.0)[..., None]
    rgb = stains_to_rgb(density, vectors, white) * light
    rgb = np.stack([_gaussian_blur(rgb[..., c], slide.blur) for c in range(3)], axis=-1)
    rgb = rgb + rng.normal(0, slide.noise, rgb.shape).astype(np.float32)
    image = np.clip(np.round(rgb * 255), 0, 255).astype(np.uint8)
    if slide.kind == "plain":
        image = np.round(image.mean(axis=-1)).astype(np.uint8)
    return _jpeg(image, slide.jpeg) if slide.jpeg else image


def _jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    """The image after a JPEG round trip at ``quality`` (a scanner's compression)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())))


class SlideReader(SceneReader):
    """``count`` synthetic brightfield slides as a dataset, drawn when read: sample ``i`` is a pure
    function of ``(seed, i)``, as maskrcnn.data.synthetic_scenes.SceneReader."""

    prefix = "slide"
    draw = staticmethod(synth_slide)

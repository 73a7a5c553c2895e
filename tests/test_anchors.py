"""Anchors: exact positions and sizes, their order, and the spec's count."""

from __future__ import annotations

import torch

from maskrcnn.config import Config
from maskrcnn.modeling.rpn.anchors import AnchorGenerator, make_bases, make_level_anchors

SPEC_SIZES = [(128, 128), (64, 64), (32, 32), (16, 16)]


def test_spec_anchor_count():
    cfg = Config(rpn_scales=[2, 4, 8, 16])  # the spec's stride-1 stem: p2 of a 256 image is 128
    gen = AnchorGenerator(cfg)
    anchors = gen(SPEC_SIZES, torch.device("cpu"))
    assert anchors.shape == (65280, 4)
    assert gen.level_sizes(SPEC_SIZES) == [128 * 128 * 3, 64 * 64 * 3, 32 * 32 * 3, 16 * 16 * 3]
    assert anchors.dtype == torch.float32


def test_bases_are_centred_with_height_width_pairs():
    bases = make_bases(8, [(1.0, 1.0), (1.0, 2.0), (2.0, 1.0)])
    assert bases.tolist() == [[-4.0, -4.0, 4.0, 4.0],      # 8 x 8
                              [-8.0, -4.0, 8.0, 4.0],      # (height, width) = (1, 2): wide
                              [-4.0, -8.0, 4.0, 8.0]]      # (2, 1): twice as tall as wide


def test_spec_aspect_ratios_give_square_wide_and_tall_anchors():
    bases = AnchorGenerator(Config()).bases[0]
    width, height = bases[:, 2] - bases[:, 0], bases[:, 3] - bases[:, 1]
    assert torch.allclose(width, torch.tensor([8.0, 16.0, 8.0], dtype=torch.float64))
    assert torch.allclose(height, torch.tensor([8.0, 8.0, 16.0], dtype=torch.float64))


def test_level_anchors_pixel_by_pixel_then_base_by_base():
    bases = make_bases(8, [(1.0, 1.0), (2.0, 1.0)])
    anchors = make_level_anchors(bases, height=2, width=3, stride=4)
    assert anchors.shape == (2 * 3 * 2, 4)
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    # Row-major pixels, each repeated once per base.
    expected = [(0, 0), (4, 0), (8, 0), (0, 4), (4, 4), (8, 4)]
    assert centres[0::2].tolist() == [list(map(float, c)) for c in expected]
    assert torch.equal(centres[0::2], centres[1::2])
    assert anchors[:4].tolist() == [[-4.0, -4.0, 4.0, 4.0], [-4.0, -8.0, 4.0, 8.0],
                                    [0.0, -4.0, 8.0, 4.0], [0.0, -8.0, 8.0, 8.0]]


def test_generator_orders_levels_and_uses_each_levels_stride_and_size():
    cfg = Config()  # strides 4, 8, 16, 32; base sizes 8, 16, 32, 64; three bases per level
    gen = AnchorGenerator(cfg)
    sizes = [(2, 3), (1, 2), (1, 1), (1, 1)]
    anchors = gen(sizes, torch.device("cpu"))
    assert gen.level_sizes(sizes) == [18, 6, 3, 3]
    assert anchors.shape == (30, 4)
    # p2, pixel (0, 0): the 8 x 8 square, then 16 wide x 8 tall, then 8 wide x 16 tall.
    assert anchors[0].tolist() == [-4.0, -4.0, 4.0, 4.0]
    assert torch.allclose(anchors[1], torch.tensor([-8.0, -4.0, 8.0, 4.0]))
    assert torch.allclose(anchors[2], torch.tensor([-4.0, -8.0, 4.0, 8.0]))
    assert anchors[3].tolist() == [0.0, -4.0, 8.0, 4.0]          # pixel (x=1, y=0): centre (4, 0)
    assert anchors[9].tolist() == [-4.0, 0.0, 4.0, 8.0]          # pixel (x=0, y=1): centre (0, 4)
    # p3 starts after 2 * 3 * 3 anchors: stride 8, base 16.
    assert anchors[18].tolist() == [-8.0, -8.0, 8.0, 8.0]
    assert anchors[21].tolist() == [0.0, -8.0, 16.0, 8.0]         # centre (8, 0)
    assert anchors[24].tolist() == [-16.0, -16.0, 16.0, 16.0]     # p4: base 32
    assert anchors[27].tolist() == [-32.0, -32.0, 32.0, 32.0]     # p5: base 64


def test_generator_caches_per_size():
    gen = AnchorGenerator(Config())
    a = gen([(2, 2)] * 4, torch.device("cpu"))
    assert gen([(2, 2)] * 4, torch.device("cpu")) is a
    assert gen([(3, 2)] * 4, torch.device("cpu")).shape[0] != a.shape[0]

"""The memory plan: --max-memory and $MASKRCNN_MAX_MEMORY, and the choice of whole, tiled or
streamed inference (and the tile size) from the budget, the image and the model's layout."""

from __future__ import annotations

import pytest

from cli_helpers import cli
from maskrcnn.config import Config
from maskrcnn.errors import UserError
from maskrcnn.presets import builtin_config
from maskrcnn.runtime.memory import (MAX_MEMORY_VARIABLE, Plan, default_max_memory, feature_units, parse_memory,
                                     plan_inference)

MB = 10**6


def test_parse_memory_units():
    assert parse_memory("2G") == parse_memory("2GB") == parse_memory("2") == 2 * 10**9
    assert parse_memory("1500M") == 1.5 * 10**9
    assert parse_memory("1GiB") == 2**30 and parse_memory("0.5 gib") == 2**29
    for bad in ("", "2X", "-1G", "G", "1e3G", "0"):
        with pytest.raises(ValueError):
            parse_memory(bad)


def test_bad_max_memory_is_one_line_and_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:  # argparse exits on a bad flag value, before main's body
        cli(capsys, "predict", tmp_path / "a.png", "--weights", "nuclei", "--out", tmp_path, "--max-memory", "lots")
    out, err = capsys.readouterr()
    assert exit_.value.code == 2 and out == ""
    assert err.count("\n") == 1 and "--max-memory" in err and "'lots'" in err


def test_plan_picks_whole_tiled_or_streamed_from_the_budget():
    cfg = Config()
    shape = (3000, 4000)
    kw = dict(resident=500 * MB, overlap=128)
    assert plan_inference(cfg, shape, 10**12, **kw) == Plan("whole", None)
    tiled = plan_inference(cfg, shape, 2 * 10**9, **kw)
    assert tiled.mode == "tiled" and 256 <= tiled.tile < 4000
    smaller = plan_inference(cfg, shape, int(1.8 * 10**9), **kw)
    assert smaller.mode == "tiled" and smaller.tile < tiled.tile  # less memory, smaller tiles
    slide = plan_inference(cfg, (40000, 40000), 2 * 10**9, **kw)
    assert slide.mode == "stream" and 256 <= slide.tile
    with pytest.warns(UserWarning, match="smallest tiles"):  # in memory (evaluate, the API) it can only warn
        assert plan_inference(cfg, (40000, 40000), 2 * 10**9, in_memory=True, **kw) == Plan("tiled", 256)
    assert plan_inference(cfg, shape, 2 * 10**9, tile=700, **kw) == Plan("tiled", 700)  # --tile forces
    with pytest.raises(UserError, match="--max-memory 0.60 GB is too small .* give at least"):
        plan_inference(cfg, (40000, 40000), 600 * MB, **kw)


def test_plan_accounts_for_the_p2_stride_and_widths():
    stride4, stride2 = Config(), Config(rpn_scales=[2, 4, 8, 16])
    wide = Config(fpn_channels=512, rpn_head_channels=512)
    assert feature_units(stride2) == 4 * feature_units(stride4)
    assert feature_units(wide) > feature_units(stride4)
    tiles = [plan_inference(c, (8000, 8000), 3 * 10**9, resident=500 * MB).tile for c in (stride4, stride2, wide)]
    assert tiles[1] < tiles[0] and tiles[2] < tiles[0]
    # a quarter of the pixels per tile at twice the p2 resolution: half the side, give or take the fixed part
    assert 0.4 < tiles[1] / tiles[0] < 0.6
    assert plan_inference(stride4, (2000, 2000), 3 * 10**9, scale=2.0, resident=500 * MB).tile < \
        plan_inference(stride4, (2000, 2000), 3 * 10**9, scale=1.0, resident=500 * MB).tile + 1


def test_default_budget_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(MAX_MEMORY_VARIABLE, "3G")
    assert default_max_memory() == 3_000_000_000
    monkeypatch.delenv(MAX_MEMORY_VARIABLE)
    assert default_max_memory() == 2_000_000_000
    monkeypatch.setenv(MAX_MEMORY_VARIABLE, "lots")
    with pytest.raises(UserError, match="MASKRCNN_MAX_MEMORY: expected a size"):
        default_max_memory()
    # an image no larger than the smallest tile is segmented whole whatever the budget: tiles cannot help
    assert plan_inference(builtin_config(), (200, 256), 1, resident=0).mode == "whole"

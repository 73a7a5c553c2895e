"""``train --init``: a new run starts from another model's weights, layout and normalisation.

Across class counts the class-specific layers start fresh (with a one-line notice) and every other
weight is the source's; a layout that does not fit is one clear error; --resume ignores --init.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from maskrcnn.modeling.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from maskrcnn.presets import nuclei_config
from maskrcnn.data.normalize import Normalizer
from maskrcnn.data.synthetic import write_synthetic_dataset
from maskrcnn.errors import UserError
from maskrcnn.modeling.model import MaskRCNN
from maskrcnn.train import TrainOptions, Trainer
from maskrcnn.train.init import CLASS_SPECIFIC

from cli_helpers import cli
from conftest import TINY_RUN


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("init") / "data"
    write_synthetic_dataset(root, 3, 64, seed=0)  # one class: nucleus
    return root


def source_checkpoint(path: Path, classes: list[str], seed: int = 5, **changes) -> Checkpoint:
    """A model with random weights (seeded) saved as a checkpoint, with a non-default normaliser."""
    torch.manual_seed(seed)
    cfg = nuclei_config(**TINY_RUN, num_classes=len(classes), class_names=classes, **changes)
    ckpt = Checkpoint(config=cfg, model_state=MaskRCNN(cfg).state_dict(),
                      normalizer=Normalizer(high_percentile=99.0).to_dict(), step=123)
    save_checkpoint(path, ckpt)
    return ckpt


def trainer(data: Path, run: Path, init: str | None, config=None, resume: bool = False) -> Trainer:
    return Trainer(TrainOptions(data=str(data), out=str(run), config=config, iters=1, batch_size=2, crop=48,
                                device="cpu", progress=False, val_fraction=0.0, init=init, resume=resume, seed=1))


def test_same_classes_every_weight_layout_and_normaliser_come_from_the_source(data, tmp_path):
    source = source_checkpoint(tmp_path / "src.pt", ["background", "nucleus"])
    t = trainer(data, tmp_path / "run", str(tmp_path / "src.pt"))
    assert t.cfg.to_dict() == source.config.to_dict()
    assert t.normalizer == Normalizer.from_dict(source.normalizer)
    state = t.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in source.model_state.items())
    assert t.step == 0  # a fresh schedule, not the source's step 123


def test_other_class_count_reinitialises_only_class_specific_layers(data, tmp_path):
    source = source_checkpoint(tmp_path / "src.pt", ["background", "a", "b"])
    with pytest.warns(UserWarning, match=r"2 class\(es\) there, 1 here; the class-specific layers start fresh"):
        t = trainer(data, tmp_path / "run", str(tmp_path / "src.pt"))
    assert t.cfg.num_classes == 2 and t.cfg.class_names == ["background", "nucleus"]
    state = t.model.state_dict()
    fresh = [k for k in state if k.startswith(CLASS_SPECIFIC)]
    assert len(fresh) == 6  # weight and bias of the box classifier, box regressor and mask predictor
    for name, value in source.model_state.items():
        if name in fresh:
            assert state[name].shape != value.shape
        else:
            assert torch.equal(state[name], value), name


def test_a_layout_that_does_not_fit_is_one_clear_error(data, tmp_path):
    source_checkpoint(tmp_path / "src.pt", ["background", "nucleus"])
    wider = nuclei_config(**{**TINY_RUN, "fpn_channels": 24})
    with pytest.raises(UserError, match=r"src.pt: its weights do not fit this model's layout"):
        trainer(data, tmp_path / "run", str(tmp_path / "src.pt"), config=wider)


def test_missing_init_file_is_a_user_error(data, tmp_path):
    with pytest.raises(UserError, match=r"nope.pt: --init needs a built-in model name or a checkpoint file"):
        trainer(data, tmp_path / "run", str(tmp_path / "nope.pt"))


@pytest.mark.slow
def test_resume_continues_the_run_and_ignores_init(data, tmp_path):
    source_checkpoint(tmp_path / "src.pt", ["background", "nucleus"])
    run = tmp_path / "run"
    first = trainer(data, run, str(tmp_path / "src.pt")).run()
    resumed = trainer(data, run, str(tmp_path / "other.pt"), resume=True)  # a missing file: never read
    assert resumed.step == first.steps
    saved = load_checkpoint(first.last).model_state
    assert all(torch.equal(resumed.model.state_dict()[k], v) for k, v in saved.items())


@pytest.mark.slow
def test_cli_train_defaults_to_the_builtin_model_for_one_class_data(data, tmp_path, capsys):
    code, _, err = cli(capsys, "train", "--data", data, "--out", tmp_path / "run", "--iters", 1, "--crop", 48,
                       "--device", "cpu", "--no-progress", "--val-every", 1)
    assert code == 0, err
    assert "starting from the built-in nuclei model" in err
    builtin = load_checkpoint(Path(__import__("maskrcnn.builtin", fromlist=["FOLDER"]).FOLDER) / "nuclei.pt")
    assert load_checkpoint(tmp_path / "run" / "last.pt").config.to_dict() == builtin.config.to_dict()

    code, _, err = cli(capsys, "train", "--data", data, "--out", tmp_path / "scratch", "--iters", 1, "--crop", 48,
                       "--device", "cpu", "--no-progress", "--init", "none", "--val-every", 1)
    assert code == 0, err
    assert "built-in" not in err
    scratch = load_checkpoint(tmp_path / "scratch" / "last.pt").model_state
    # the same layout (the CLI's default is the built-in one), but not the built-in weights
    assert scratch.keys() == builtin.model_state.keys()
    assert not torch.equal(scratch["rcnn.head.fc1.weight"], builtin.model_state["rcnn.head.fc1.weight"].float())


def test_learning_rate_default_follows_the_start():
    from maskrcnn.train import FINETUNE_LR, SCRATCH_LR, TrainOptions

    assert TrainOptions(data="d", out="o").lr == SCRATCH_LR
    assert TrainOptions(data="d", out="o", init="nuclei").lr == FINETUNE_LR < SCRATCH_LR
    assert TrainOptions(data="d", out="o", init="nuclei", lr=3e-3).lr == 3e-3

"""Checkpoints: plain data loaded with weights_only=True, and one-line errors for bad files."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

import maskrcnn
from maskrcnn.modeling.checkpoint import FORMAT, Checkpoint, load_checkpoint, save_checkpoint
from maskrcnn.presets import nuclei_config
from maskrcnn.data.normalize import Normalizer
from maskrcnn.errors import UserError


def make_checkpoint(**changes) -> Checkpoint:
    values = dict(config=nuclei_config(num_classes=3, class_names=["background", "nucleus", "cell"]),
                  model_state={"layer.weight": torch.arange(6.0).reshape(2, 3), "layer.bias": torch.zeros(2)},
                  normalizer=Normalizer(method="fixed", channels=1, fixed_range=(0, 4095)).to_dict(),
                  step=7, epoch=2, batch_in_epoch=1,
                  optimizer_state={"state": {0: {"step": torch.tensor(7.0)}}, "param_groups": [{"lr": 0.1}]},
                  rng_state=torch.get_rng_state(), metrics={"mask_ap": 0.25, "box_ap50": float("nan")},
                  best_score=0.25)
    values.update(changes)
    return Checkpoint(**values)


def test_round_trip_keeps_everything(tmp_path):
    path = tmp_path / "run" / "last.pt"
    original = make_checkpoint()
    save_checkpoint(path, original)
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temporary file left behind

    loaded = load_checkpoint(path)
    assert loaded.config == original.config
    assert loaded.class_names == ["background", "nucleus", "cell"]
    assert Normalizer.from_dict(loaded.normalizer) == Normalizer(method="fixed", channels=1, fixed_range=(0, 4095))
    assert loaded.model_state.keys() == original.model_state.keys()
    assert all(torch.equal(loaded.model_state[k], v) for k, v in original.model_state.items())
    assert (loaded.step, loaded.epoch, loaded.batch_in_epoch) == (7, 2, 1)
    assert loaded.optimizer_state["param_groups"] == [{"lr": 0.1}]
    assert torch.equal(loaded.rng_state, original.rng_state)
    assert loaded.metrics["mask_ap"] == 0.25 and np.isnan(loaded.metrics["box_ap50"])
    assert loaded.best_score == 0.25
    assert loaded.version == maskrcnn.__version__


def test_file_is_plain_data(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, make_checkpoint(optimizer_state=None, rng_state=None, best_score=None))
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == FORMAT and payload["version"] == maskrcnn.__version__
    assert payload["config"]["class_names"] == ["background", "nucleus", "cell"]
    assert payload["normalizer"]["fixed_range"] == [0.0, 4095.0]
    loaded = load_checkpoint(path)
    assert loaded.optimizer_state is None and loaded.rng_state is None and loaded.best_score is None


def test_tensors_are_moved_to_the_cpu_when_saved(tmp_path):
    weight = torch.ones(2, requires_grad=True) * 2  # a non-leaf tensor with a graph
    save_checkpoint(tmp_path / "a.pt", make_checkpoint(model_state={"w": weight}))
    loaded = load_checkpoint(tmp_path / "a.pt")
    assert not loaded.model_state["w"].requires_grad and loaded.model_state["w"].device.type == "cpu"


class _Payload:
    """Pickles as a call to open(marker, "w"): loading it must not run it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_refuses_a_file_that_holds_code(tmp_path):
    marker = tmp_path / "was_run"
    path = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "config": {}, "model": {}, "hook": _Payload(marker)}, path)
    with pytest.raises(UserError, match="refused to load: it holds code or objects") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("content", [
    b"\x80\x02s",  # IndexError inside torch.load
    b"\x80\x02h\x05",  # KeyError
    b"\x80\x02J\xc8",  # struct.error
    b"\x80\x02U\x02\xff\xfe.",  # UnicodeDecodeError
    b"\x80\x02\x8a`",  # EOFError
    b"\xc9\x88\xf1/\xe99\xdc",  # UnpicklingError: unsupported operand
    b"PK\x03\x04junk",  # RuntimeError from the zip reader
    b"\x00",
], ids=["index", "key", "struct", "unicode", "eof", "operand", "zip", "zero"])
def test_damaged_bytes_are_a_corrupt_checkpoint(tmp_path, content):
    path = tmp_path / "damaged.pt"
    path.write_bytes(content)
    with pytest.raises(UserError, match="damaged.pt: corrupt or truncated checkpoint") as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("seed", range(12))
def test_random_bytes_are_a_corrupt_checkpoint(tmp_path, seed):
    """Bytes that are no checkpoint raise many exception types inside torch.load; all become one error."""
    rng = np.random.default_rng(seed)
    path = tmp_path / "random.pt"
    prefix = b"\x80\x02" if seed % 2 else b""  # half of them look like a pickle at first
    path.write_bytes(prefix + rng.bytes(int(rng.integers(1, 200))))
    with pytest.raises(UserError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    assert "corrupt or truncated checkpoint" in message or "refused to load" in message


def test_truncated_and_empty_files_are_corrupt(tmp_path):
    good = tmp_path / "good.pt"
    save_checkpoint(good, make_checkpoint())
    data = good.read_bytes()
    for name, content in (("empty.pt", b""), ("half.pt", data[: len(data) // 2]), ("tail.pt", data[-200:])):
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(UserError, match=f"{name}: corrupt or truncated checkpoint"):
            load_checkpoint(path)


def test_missing_file_or_folder(tmp_path):
    with pytest.raises(UserError, match="nothing.pt: checkpoint not found"):
        load_checkpoint(tmp_path / "nothing.pt")
    with pytest.raises(UserError, match="checkpoint not found"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("payload", [{"model": {}}, torch.zeros(3), [1, 2], {"format": "other/1"}])
def test_other_torch_files_are_not_checkpoints(tmp_path, payload):
    path = tmp_path / "other.pt"
    torch.save(payload, path)
    with pytest.raises(UserError, match="other.pt: not a maskrcnn checkpoint"):
        load_checkpoint(path)


def test_a_legacy_pickle_is_not_loaded(tmp_path):
    path = tmp_path / "legacy.pt"
    with open(path, "wb") as f:
        pickle.dump({"format": FORMAT}, f, protocol=2)
    with pytest.raises(UserError, match="legacy.pt"):
        load_checkpoint(path)


def test_bad_config_in_a_checkpoint_names_the_file(tmp_path):
    path = tmp_path / "bad.pt"
    save_checkpoint(path, make_checkpoint())
    payload = torch.load(path, weights_only=True)
    payload["config"]["backbone"] = "vgg16"
    torch.save(payload, path)
    with pytest.raises(UserError, match="bad.pt.*backbone"):
        load_checkpoint(path)

"""Adapter files record the versioned SVD preset, so their bases stay reproducible when the defaults move on.

A 400 x 400 weight at r = 2 takes the Krylov path, where the v1 and v2 presets give bases that differ in the
last bits (inside the fingerprint tolerance, so a wrong preset would load silently with other bases).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import pica_kernels as pk
from pica_kernels import svd
from pica_kernels.core.files import file_sha256, json_checksum
from pica_kernels.native.apply import pica_layers
from pica_kernels.native.files import CONFIG_FILE, FORMAT, TENSORS_FILE


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(400, 400)

    def forward(self, x):
        return self.proj(x)


def _model():
    torch.manual_seed(0)
    return _Net()


def _basis(model):
    return dict(pica_layers(model))["proj"].basis()


def _v(model, method):
    return svd.truncated_svd(model.proj.weight.detach(), 2, "input", method=method)[0]


def _trained(tmp_path, method="accurate"):
    model = pk.apply_pica(_model(), pk.PiCaConfig(rank=2, target_modules=["proj"], svd_method=method), progress=False)
    with torch.no_grad():
        for p in model.pica_bank.parameters():
            p.normal_()
    return model, pk.save_adapter(model, tmp_path / "adapter")


def test_presets_differ_on_this_weight():
    model = _model()
    assert not torch.equal(_v(model, "accurate-v1"), _v(model, "accurate-v2"))


def test_file_records_the_versioned_preset_and_reloads_it_after_the_default_moves(tmp_path, monkeypatch):
    model, path = _trained(tmp_path)
    assert json.loads((path / CONFIG_FILE).read_text())["config"]["svd_method"] == "accurate-v2"
    monkeypatch.setitem(svd.SVD_METHOD_ALIASES, "accurate", "accurate-v1")  # a later release moves "accurate"
    loaded = pk.load_adapter(_model(), path, progress=False)
    torch.testing.assert_close(_basis(loaded), _basis(model), rtol=0, atol=0)
    assert loaded.pica_bank.configs["default"].svd_method == "accurate-v2"


def _as_written_before_versioning(path, method):
    """Rewrite the file as a pica_kernels from before versioned presets wrote it: a plain preset name."""
    from safetensors.torch import load_file, save_file

    meta = json.loads((path / CONFIG_FILE).read_text())
    meta["config"]["svd_method"] = method
    sha = json_checksum(meta)
    save_file(load_file(path / TENSORS_FILE), path / TENSORS_FILE, metadata={"format": FORMAT, "config_sha256": sha})
    meta["json_sha256"], meta["tensors_sha256"] = sha, file_sha256(path / TENSORS_FILE)
    (path / CONFIG_FILE).write_text(json.dumps(meta))


def test_plain_name_in_an_old_file_means_the_v1_preset(tmp_path):
    model, path = _trained(tmp_path, method="accurate-v1")  # what "accurate" computed before versioning
    _as_written_before_versioning(path, "accurate")
    loaded = pk.load_adapter(_model(), path, progress=False)
    assert loaded.pica_bank.configs["default"].svd_method == "accurate-v1"
    torch.testing.assert_close(_basis(loaded), _v(_model(), "accurate-v1"), rtol=0, atol=0)
    torch.testing.assert_close(_basis(loaded), _basis(model), rtol=0, atol=0)
    x = torch.randn(3, 400)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_peft_config_records_the_versioned_preset(tmp_path):
    peft = pytest.importorskip("peft")
    from pica_kernels.peft import PiCaPeftConfig

    model = peft.get_peft_model(copy.deepcopy(_model()), PiCaPeftConfig(r=2, target_modules=["proj"]))
    model.save_pretrained(tmp_path / "p")
    saved = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert saved["svd_method"] == "accurate-v2"
    assert PiCaPeftConfig.from_pretrained(tmp_path / "p").svd_method == "accurate-v2"
    saved["svd_method"] = "accurate"  # as written before versioning
    (tmp_path / "p" / "adapter_config.json").write_text(json.dumps(saved))
    assert PiCaPeftConfig.from_pretrained(tmp_path / "p").svd_method == "accurate-v1"
    loaded = peft.PeftModel.from_pretrained(_model(), tmp_path / "p")
    layer = loaded.base_model.model.proj
    torch.testing.assert_close(layer.pica_basis["default"], _v(_model(), "accurate-v1"), rtol=0, atol=0)
    with pytest.raises(ValueError, match="svd_method must be one of"):
        PiCaPeftConfig(r=2, svd_method="magic")

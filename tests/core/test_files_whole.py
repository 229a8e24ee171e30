"""Adapter files checked whole: a file edited by hand and made self-consistent again (the checksums are unkeyed)
is still refused when it does not fit the model; both front ends where the case applies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

import pica_kernels as pk
from pica_kernels.core import files

TOKENS = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(0))
IDENTITY_KEY = "base_model.pica_base_model_identity"


def _randomize(ms) -> None:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for key in sorted(ms):
            ms[key].copy_(torch.randn(ms[key].shape, generator=gen) * 0.05)


class Native:
    def build(self, model, **cfg):
        model = pk.apply_pica(model, pk.PiCaConfig(rank=4, **cfg), progress=False)
        _randomize(dict(model.pica_bank["default"].items()))
        return model

    def save(self, model, path):
        return pk.save_adapter(model, path)

    def load(self, model, path, check_base_model="error"):
        return pk.load_adapter(model, path, progress=False, check_base_model=check_base_model)

    def edit(self, path: Path, edit_meta=None, edit_tensors=None) -> None:
        """Edit pica_config.json and / or the tensors, then make the pair self-consistent again."""
        from safetensors import safe_open
        from safetensors.torch import load_file, save_file

        meta = json.loads((path / "pica_config.json").read_text())
        file = path / "pica_adapter.safetensors"
        tensors = load_file(file)
        with safe_open(file, "pt") as f:
            metadata = f.metadata()
        if edit_meta:
            edit_meta(meta)
        if edit_tensors:
            edit_tensors(tensors)
        sha = files.json_checksum(meta)
        save_file(tensors, file, metadata={**metadata, "config_sha256": sha})
        meta["json_sha256"], meta["tensors_sha256"] = sha, files.file_sha256(file)
        (path / "pica_config.json").write_text(json.dumps(meta))

    def edit_identities(self, path: Path, edit) -> None:
        """``edit(identities)`` on every recorded tensor identity (untargeted and targeted weights)."""
        def edit_meta(meta):
            edit(meta["base_tensors"])
            edit({n: info["weight"] for n, info in meta["layers"].items()})
        self.edit(path, edit_meta)

    def edit_m(self, path: Path, fn) -> None:
        def edit_tensors(tensors):
            for k in [k for k in tensors if k.startswith("m.")]:
                tensors[k] = fn(tensors[k])
        self.edit(path, edit_tensors=edit_tensors)

    def logits(self, model):
        with torch.no_grad():
            return model(TOKENS).logits


class Peft(Native):
    def build(self, model, **cfg):
        from peft import get_peft_model

        from pica_kernels.peft import PiCaPeftConfig

        model = get_peft_model(model, PiCaPeftConfig(r=4, **cfg))
        _randomize(dict(model.base_model.pica_M["default"].items()))
        return model

    def save(self, model, path):
        model.save_pretrained(path)
        return path

    def load(self, model, path, check_base_model="error"):
        from peft import PeftModel

        from pica_kernels.peft import PiCaPeftConfig

        config = PiCaPeftConfig.from_pretrained(path)
        config.check_base_model = check_base_model
        return PeftModel.from_pretrained(model, path, config=config)

    def _edit_tensors(self, path: Path, edit) -> None:
        from safetensors.torch import load_file, save_file

        file = path / "adapter_model.safetensors"
        tensors = load_file(file)
        edit(tensors)
        save_file(tensors, file, metadata={"format": "pt"})

    def edit_identities(self, path: Path, edit) -> None:
        def edit_tensors(tensors):
            ids = json.loads(tensors[IDENTITY_KEY].numpy().tobytes().decode())
            edit(ids)
            tensors[IDENTITY_KEY] = torch.frombuffer(bytearray(json.dumps(ids).encode()), dtype=torch.uint8)
        self._edit_tensors(path, edit_tensors)

    def edit_m(self, path: Path, fn) -> None:
        def edit_tensors(tensors):
            for k in [k for k in tensors if ".pica_M." in k]:
                tensors[k] = fn(tensors[k])
        self._edit_tensors(path, edit_tensors)


API = {"native": Native(), "peft": Peft()}
FRONT_ENDS = list(API)


def _drop(field):
    def edit(ids):
        for ident in ids.values():
            ident.pop(field, None)
    return edit


# ------------------------------------------------------------------ recorded identities
@pytest.mark.parametrize("fe", FRONT_ENDS)
@pytest.mark.parametrize("field", ["sample_sha256", "norm", "probe", "dtype"])
def test_identity_field_removed_is_a_refusal(fe, field, tmp_path):
    """Without sample_sha256 the base-model check used to be skipped: the adapter then loaded onto another model
    of the same shapes (tiny_model with another seed) and gave other logits."""
    api = API[fe]
    path = api.save(api.build(tiny_model("llama")), tmp_path / fe)
    api.edit_identities(path, _drop(field))
    with pytest.raises(pk.AdapterMismatchError, match=rf"identity of it has no valid '{field}' field"):
        api.load(tiny_model("llama", seed=1), path)
    with pytest.raises(pk.AdapterMismatchError, match=rf"identity of it has no valid '{field}' field"):
        api.load(tiny_model("llama"), path)


def test_peft_identity_removed_whole_is_a_refusal(tmp_path):
    api = API["peft"]
    path = api.save(api.build(tiny_model("llama")), tmp_path)
    api._edit_tensors(path, lambda tensors: tensors.pop(IDENTITY_KEY))
    with pytest.raises(pk.AdapterMismatchError, match="records no identity of its base model"):
        api.load(tiny_model("llama", seed=1), path)
    with pytest.warns(UserWarning, match="records no identity of its base model"):
        api.load(tiny_model("llama"), path, check_base_model="warn")


def test_identity_of_a_tensor_without_data_says_so():
    ident = files.tensor_identity(torch.empty(3, 4, device="meta"))
    assert ident == {"shape": [3, 4], "dtype": "float32", files.NO_DATA: "not recorded: the tensor had no data "
                                                                        "(meta device)"}
    empty = files.tensor_identity(torch.empty(0, 4))
    assert "sample_sha256" in empty and files.compare_identity("e", empty, empty) is None


@pytest.mark.parametrize("fe", FRONT_ENDS)
def test_identities_recorded_without_data_are_not_trusted(fe, tmp_path):
    api = API[fe]
    path = api.save(api.build(tiny_model("llama")), tmp_path / fe)

    def no_data(ids):
        for key in [k for k in ids if k.endswith("norm.weight")]:
            ids[key] = {"shape": ids[key]["shape"], "dtype": ids[key]["dtype"], files.NO_DATA: "not recorded: meta"}
    api.edit_identities(path, no_data)
    with pytest.raises(pk.AdapterMismatchError, match=r"norm.weight': the adapter file does not record its values"):
        api.load(tiny_model("llama"), path)
    with pytest.warns(UserWarning, match="does not record its values"):
        api.load(tiny_model("llama"), path, check_base_model="warn")


def _deferred_checks(model):
    """The forward pre-hooks that :func:`files.check_when_data` left on any module of ``model`` (other hooks,
    such as the adapter state's forward scope, stay for the model's life)."""
    return [h for m in model.modules() for h in m._forward_pre_hooks.values()
            if "check_when_data" in getattr(h, "__qualname__", "")]


def _norm_on_meta(model):
    """The final norm's weight without data (as a model built on the meta device and filled in later)."""
    norm = model.model.norm
    values = norm.weight.detach().clone()
    norm.weight = torch.nn.Parameter(torch.empty_like(values, device="meta"), requires_grad=False)
    return norm, values


@pytest.mark.parametrize("fe", FRONT_ENDS)
@pytest.mark.parametrize("same", [True, False])
def test_model_tensor_without_data_is_checked_once_it_has_data(fe, same, tmp_path):
    api = API[fe]
    trained = api.build(tiny_model("llama"))
    path = api.save(trained, tmp_path / fe)
    model = tiny_model("llama")
    norm, values = _norm_on_meta(model)
    loaded = api.load(model, path)  # nothing to compare yet
    assert len(_deferred_checks(loaded)) == 1
    norm.weight = torch.nn.Parameter(values if same else values + 1.0, requires_grad=False)
    if same:
        torch.testing.assert_close(api.logits(loaded), api.logits(trained), rtol=0, atol=0)
        assert not _deferred_checks(loaded)  # checked once, then the hook is gone
    else:
        with pytest.raises(pk.AdapterMismatchError, match=r"model.norm.weight': values differ"):
            api.logits(loaded)


def test_offloaded_tensors_are_read_from_their_offload_store():
    from accelerate import cpu_offload

    model = tiny_model("llama")
    want = {k: files.tensor_identity(t) for k, t in model.state_dict().items()}
    cpu_offload(model, execution_device=torch.device("cpu"))
    assert model.model.norm.weight.device.type == "meta"
    got = {k: files.tensor_identity(t) for k, t in files.base_tensors(model).items()}
    assert got == want


# ------------------------------------------------------------------ M
@pytest.mark.parametrize("fe", FRONT_ENDS)
@pytest.mark.parametrize(("edit", "says"), [
    (lambda m: (m * 100).to(torch.int8), r"int8|floating-point"),
    (lambda m: torch.where(torch.arange(m.numel()).reshape(m.shape) == 1, float("nan"), m), "non-finite"),
    (lambda m: torch.full_like(m, float("inf")), "non-finite"),
])
def test_m_that_is_no_finite_float_matrix_is_refused(fe, edit, says, tmp_path):
    api = API[fe]
    path = api.save(api.build(tiny_model("llama")), tmp_path / fe)
    api.edit_m(path, edit)
    with pytest.raises(pk.AdapterMismatchError, match=says):
        api.load(tiny_model("llama"), path)


def test_native_m_dtype_compared_with_the_tensor(tmp_path):
    api = API["native"]
    path = api.save(api.build(tiny_model("llama")), tmp_path)
    api.edit_m(path, lambda m: m.double())
    with pytest.raises(pk.AdapterMismatchError, match=r"m_dtype: .* records float32, its tensor .* is float64"):
        api.load(tiny_model("llama"), path)

    def both(meta):
        for g in meta["groups"].values():
            g["m_dtype"] = "int8"
    api.edit(path, both, lambda tensors: tensors.update({k: (v * 100).to(torch.int8) for k, v in tensors.items()
                                                          if k.startswith("m.")}))
    with pytest.raises(pk.AdapterMismatchError, match="floating-point matrix"):
        api.load(tiny_model("llama"), path)


# ------------------------------------------------------------------ fingerprints across dtypes
@pytest.mark.parametrize("fe", FRONT_ENDS)
def test_fp32_adapter_loads_on_an_fp64_copy_of_its_base(fe, tmp_path):
    api = API[fe]
    trained = api.build(tiny_model("llama"))
    path = api.save(trained, tmp_path / fe)
    loaded = api.load(tiny_model("llama").double(), path)
    torch.testing.assert_close(api.logits(loaded).float(), api.logits(trained), rtol=1e-4, atol=1e-4)


def test_fingerprint_tolerance_is_the_coarser_of_the_two_dtypes():
    assert files.fingerprint_atol(torch.float64, torch.float32) == files.FINGERPRINT_ATOL[torch.float32]
    assert files.fingerprint_atol(torch.bfloat16, torch.float64) == files.FINGERPRINT_ATOL[torch.bfloat16]
    assert files.fingerprint_atol(torch.float64) == files.FINGERPRINT_ATOL[torch.float64]

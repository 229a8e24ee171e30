"""The silent failures a careless user ran into, each now refused or fixed.

Adapter files edited by hand, interrupted model edits (also Ctrl-C during the
SVD or the module swaps), errors that must name their argument, a base model
that differs outside the adapted layers, and fused MoE experts left out.
"""

import copy
import json
import warnings

import pytest
import torch
from conftest import randomize_m, tiny_model
from torch import nn

import pica_kernels as pk
import pica_kernels.core.bases as bases_mod
import pica_kernels.native.apply as apply_mod
from pica_kernels import AdapterMismatchError, PiCaError, PiCaLinear
from pica_kernels.core.files import tensor_identity
from pica_kernels.native.files import CONFIG_FILE

TOKENS = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))


def _trained(tmp_path, **cfg):
    model = pk.apply_pica(tiny_model("llama"), pk.PiCaConfig(rank=4, **cfg), progress=False)
    randomize_m(model)
    return model, pk.save_adapter(model, tmp_path / "adapter")


def _edit_json(path, edit):
    meta = json.loads((path / CONFIG_FILE).read_text())
    edit(meta)
    (path / CONFIG_FILE).write_text(json.dumps(meta))


def _snapshot(model):
    """Everything an edit must leave as it was: parameters, requires_grad, module tree, state_dict keys, outputs."""
    return {
        "params": {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()},
        "modules": [(n, type(m).__name__) for n, m in model.named_modules()],
        "keys": list(model.state_dict()),
        "logits": model(TOKENS).logits.detach(),
    }


def _assert_unchanged(model, before):
    after = _snapshot(model)
    assert after["modules"] == before["modules"]
    assert after["keys"] == before["keys"]
    assert after["params"].keys() == before["params"].keys()
    for n, (p, grad) in after["params"].items():
        torch.testing.assert_close(p, before["params"][n][0], rtol=0, atol=0, equal_nan=True, msg=n)
        assert grad == before["params"][n][1], n
    torch.testing.assert_close(after["logits"], before["logits"], rtol=0, atol=0, equal_nan=True)


# ------------------------------------------------------------------ (1) files
def test_error_hierarchy():
    assert issubclass(AdapterMismatchError, PiCaError) and issubclass(AdapterMismatchError, ValueError)
    import pica_kernels.peft

    assert not hasattr(pica_kernels.peft, "BasisMismatchError")  # one name for one error: AdapterMismatchError


def test_group_deleted_from_json_is_refused(tmp_path):
    _, path = _trained(tmp_path)
    _edit_json(path, lambda m: m["groups"].pop("mlp-down_proj-48x80"))
    with pytest.raises(AdapterMismatchError, match=r"groups: the tensor file holds 'm.mlp-down_proj-48x80' but "
                                                   r"pica_config.json lists no group .*\(4 groups"):
        pk.load_adapter(tiny_model("llama"), path)


def test_layer_deleted_from_json_is_refused(tmp_path):
    _, path = _trained(tmp_path)

    def drop(meta):
        meta["layers"].pop("model.layers.1.self_attn.q_proj")
        meta["groups"]["self_attn-q_proj-48x48"]["layers"].remove("model.layers.1.self_attn.q_proj")

    _edit_json(path, drop)
    with pytest.raises(AdapterMismatchError, match=r"layers: the tensor file holds "
                                                   r"'fingerprint.model.layers.1.self_attn.q_proj'"):
        pk.load_adapter(tiny_model("llama"), path)


def test_edited_rank_is_refused_naming_both_values(tmp_path):
    _, path = _trained(tmp_path)
    _edit_json(path, lambda m: m["config"].update(rank=8))
    model = tiny_model("llama")
    before = _snapshot(model)
    with pytest.raises(AdapterMismatchError, match=r"rank: pica_config.json says 8, layer .* has rank 4"):
        pk.load_adapter(model, path)
    _assert_unchanged(model, before)


def test_edited_group_rank_is_refused(tmp_path):
    _, path = _trained(tmp_path)

    def edit(meta):
        for g in meta["groups"].values():
            g["rank"] = 8
        meta["config"]["rank"] = 8

    _edit_json(path, edit)
    with pytest.raises(AdapterMismatchError, match=r"rank: pica_config.json says 8, the tensor file's m\..*\(rank 4\)"):
        pk.load_adapter(tiny_model("llama"), path)


def test_any_other_json_edit_fails_the_checksum(tmp_path):
    _, path = _trained(tmp_path)
    _edit_json(path, lambda m: m["config"].update(svd_seed=1))
    with pytest.raises(AdapterMismatchError, match="json_sha256: .*edited by hand"):
        pk.load_adapter(tiny_model("llama"), path)


@pytest.mark.parametrize("key", ["groups", "layers", "config", "base_tensors"])
def test_missing_json_key_names_the_field(tmp_path, key):
    _, path = _trained(tmp_path)
    _edit_json(path, lambda m: m.pop(key))
    with pytest.raises(AdapterMismatchError, match=f"field {key!r} is missing"):
        pk.load_adapter(tiny_model("llama"), path)


# --------------------------------------------------------- (2)+(3) atomic edits
class _Interrupt:
    """A stand-in for a function that raises KeyboardInterrupt on its ``after``-th call (only)."""

    def __init__(self, real, after=1):
        self.real, self.after, self.calls = real, after, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.after:  # one Ctrl-C, as a user gives it
            raise KeyboardInterrupt
        return self.real(*args, **kwargs)


@pytest.mark.parametrize("where, after", [("svd", 2), ("swap", 4)])
def test_interrupted_apply_leaves_the_model_exactly_as_it_was(monkeypatch, where, after):
    model = tiny_model("llama")
    model.lm_head.weight.requires_grad_(True)
    before = _snapshot(model)
    target = (bases_mod, "truncated_svd") if where == "svd" else (apply_mod, "set_submodule")
    monkeypatch.setattr(*target, _Interrupt(getattr(*target), after))
    with pytest.raises(KeyboardInterrupt):
        pk.apply_pica(model, pk.PiCaConfig(rank=4), progress=False)
    assert getattr(*target).calls >= after  # it did stop half-way
    monkeypatch.undo()
    _assert_unchanged(model, before)
    assert not hasattr(model, "pica_bank")
    # The retry works as a first apply: the adapter is active and M gets a gradient.
    pk.apply_pica(model, pk.PiCaConfig(rank=4), progress=False)
    assert pk.native.model.active_adapter(model) == "default"
    model(TOKENS).logits.sum().backward()
    assert all(p.grad is not None for p in model.pica_bank.parameters())


def test_apply_that_fails_on_a_nan_weight_changes_nothing():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[2].mlp.up_proj.weight[0, 0] = float("nan")
    before = _snapshot(model)
    with pytest.raises(Exception):  # noqa: B017 - whichever error the SVD gives; the model is what is checked
        pk.apply_pica(model, pk.PiCaConfig(rank=4), progress=False)
    _assert_unchanged(model, before)


@pytest.mark.parametrize("where", ["svd", "fingerprint"])
def test_interrupted_load_onto_a_plain_model_changes_nothing(tmp_path, monkeypatch, where):
    _, path = _trained(tmp_path)
    model = tiny_model("llama")
    before = _snapshot(model)
    import pica_kernels.native.files as adapters_mod

    target = (bases_mod, "truncated_svd") if where == "svd" else (adapters_mod, "check_basis_fingerprint")
    monkeypatch.setattr(*target, _Interrupt(getattr(*target), 3))
    with pytest.raises(KeyboardInterrupt):
        pk.load_adapter(model, path, progress=False)
    monkeypatch.undo()
    _assert_unchanged(model, before)


def test_failed_load_onto_a_pica_model_with_fewer_layers_changes_nothing(tmp_path, monkeypatch):
    _, path = _trained(tmp_path)
    model = pk.apply_pica(tiny_model("llama"), pk.PiCaConfig(rank=2, target_modules=["q_proj"]),
                          adapter_name="other", progress=False)
    randomize_m(model)
    before = _snapshot(model)
    import pica_kernels.native.files as adapters_mod

    monkeypatch.setattr(adapters_mod, "check_basis_fingerprint", _Interrupt(adapters_mod.check_basis_fingerprint, 5))
    with pytest.raises(KeyboardInterrupt):
        pk.load_adapter(model, path, progress=False)
    monkeypatch.undo()
    _assert_unchanged(model, before)  # no extra layer left wrapped, no key renamed to ...base_layer.weight
    assert set(model.pica_bank.configs) == {"other"}


def test_failed_reload_into_the_same_adapter_keeps_its_m(tmp_path, monkeypatch):
    model, path = _trained(tmp_path)
    other = copy.deepcopy(model)
    randomize_m(other, seed=5)
    before = _snapshot(other)
    import pica_kernels.native.model as model_mod

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("pica_kernels.native.files.set_adapter", boom)
    with pytest.raises(KeyboardInterrupt):
        pk.load_adapter(other, path, progress=False)
    assert model_mod.set_adapter is not boom
    _assert_unchanged(other, before)


# ------------------------------------------------------------------ (4) errors
def test_int8_weight_is_refused_naming_the_dtype():
    layer = nn.Linear(8, 8)
    layer.weight = nn.Parameter(torch.randint(-5, 5, (8, 8), dtype=torch.int8), requires_grad=False)
    with pytest.raises(TypeError, match="weight has dtype torch.int8; PiCa needs a floating-point weight"):
        PiCaLinear(layer, rank=2)
    model = nn.Sequential(layer)
    with pytest.raises(TypeError, match="layer '0': weight has dtype torch.int8"):
        pk.apply_pica(model, pk.PiCaConfig(rank=2, target_modules=["0"]), progress=False)
    assert not hasattr(model, "pica_bank")


def test_zero_dim_x_is_refused_naming_x():
    layer = PiCaLinear(nn.Linear(8, 6), rank=2)
    with pytest.raises(ValueError, match=r"x must be \(\.\.\., in=8\), got shape \(\)"):
        layer(torch.tensor(1.0))


def test_bias_dtype_other_than_x_is_refused():
    base = nn.Linear(8, 6)
    base.bias.data = base.bias.data.double()
    layer = PiCaLinear(base, rank=2)
    with pytest.raises(TypeError, match="bias has dtype torch.float64 but x has torch.float32"):
        layer(torch.randn(3, 8))


def test_integer_or_bool_basis_and_m_dtype_are_refused():
    with pytest.raises(TypeError, match="basis must be a floating-point tensor, got dtype torch.int64"):
        PiCaLinear(nn.Linear(8, 6), rank=2, basis=torch.ones(2, 8, dtype=torch.long))
    with pytest.raises(TypeError, match="basis must be a floating-point tensor, got dtype torch.bool"):
        PiCaLinear(nn.Linear(8, 6), rank=2, basis=torch.ones(2, 8, dtype=torch.bool))
    with pytest.raises(TypeError, match="m_dtype must be a floating-point dtype, got torch.int32"):
        PiCaLinear(nn.Linear(8, 6), rank=2, m_dtype=torch.int32)


def test_base_sentinel_is_not_an_adapter_name(tiny_llama):
    with pytest.raises(ValueError, match="adapter_name '__base__' is reserved"):
        pk.apply_pica(tiny_llama, pk.PiCaConfig(rank=2), adapter_name="__base__", progress=False)
    assert not hasattr(tiny_llama, "pica_bank")


# ------------------------------------------------------- (5) whole-model check
@pytest.mark.parametrize("tensor", ["model.layers.1.self_attn.o_proj.weight", "model.embed_tokens.weight",
                                    "model.layers.0.input_layernorm.weight"])
def test_model_differing_only_outside_the_targets_is_refused(tmp_path, tensor):
    _, path = _trained(tmp_path)
    model = tiny_model("llama")
    with torch.no_grad():
        t = model.get_parameter(tensor)
        t.mul_(1.01)
    with pytest.raises(AdapterMismatchError, match=f"base_tensors: .*tensor {tensor!r}"):
        pk.load_adapter(model, path, progress=False)
    assert not hasattr(model, "pica_bank")
    with pytest.warns(UserWarning, match=f"base_tensors: .*tensor {tensor!r}"):
        pk.load_adapter(model, path, progress=False, check_base_model="warn")
    assert hasattr(model, "pica_bank")


def test_model_fingerprint_holds_no_float64_copy_and_samples_on_device():
    w = torch.randn(256, 512, dtype=torch.bfloat16)
    ident = tensor_identity(w)
    assert ident["shape"] == [256, 512] and ident["dtype"] == "bfloat16"
    # Same values in another dtype agree within rounding; a 1% change (above bf16 rounding) does not.
    from pica_kernels.core.files import compare_identity

    assert compare_identity("w", tensor_identity(w.float()), ident) is None
    assert compare_identity("w", tensor_identity(w * 1.01), ident) is not None


def test_model_fingerprint_of_a_tensor_beyond_float32_integer_precision():
    t = torch.zeros(2**24 + 2, dtype=torch.uint8)  # float32 positions would round n-1 = 2**24+1 off the end
    t[-1] = 7
    assert tensor_identity(t)["sample_sha256"] != tensor_identity(torch.zeros_like(t))["sample_sha256"]


# --------------------------------------------------------- (7) fused experts
def _tiny_mixtral():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.MixtralConfig(vocab_size=97, hidden_size=48, intermediate_size=32, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    return tf.AutoModelForCausalLM.from_config(cfg).eval()


def test_all_linear_on_fused_moe_experts_warns_and_reports_the_share_left_out():
    """Fused experts of a layout PiCa does not adapt (here marked transposed, as gpt-oss stores them) are left out
    of "all-linear" with a warning and counted in the report; a supported layout is adapted (tests/native/
    test_moe.py), with nothing left out."""
    model = _tiny_mixtral()
    for layer in model.model.layers:
        layer.mlp.experts.is_transposed = True
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    total = sum(p.numel() for p in model.parameters())
    with pytest.warns(UserWarning, match=r"leaves out 2 module\(s\) with fused 3-D expert weights \(mlp.experts\), "
                                         rf"{100 * experts / total:.1f}% of the model's parameters"):
        pk.apply_pica(model, pk.PiCaConfig(rank=2, target_modules="all-linear"), progress=False)
    report = pk.parameter_report(model)
    assert report.left_out == {f"model.layers.{i}.mlp.experts": experts // 2 for i in range(2)}
    assert "not adapted: 2 fused expert module(s) (mlp.experts)" in str(report)
    supported = _tiny_mixtral()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        pk.apply_pica(supported, pk.PiCaConfig(rank=2, target_modules="all-linear"), progress=False)
    report = pk.parameter_report(supported)
    assert not report.left_out and {"mlp.experts.gate_proj", "mlp.experts.up_proj", "mlp.experts.down_proj"} <= {
        g.role for g in report.groups}


def test_peft_all_linear_on_fused_moe_experts_warns():
    from peft import get_peft_model

    from pica_kernels.peft import PiCaPeftConfig

    with pytest.warns(UserWarning, match=r"fused 3-D expert weights \(mlp.experts\)"):
        get_peft_model(_tiny_mixtral(), PiCaPeftConfig(r=2, target_modules="all-linear"))


def test_sequential_model_runs_with_its_bank():
    """apply_pica on an nn.Sequential registers the bank as its last child; Sequential calls it (was an error)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    x = torch.randn(3, 8)
    before = model(x)
    pk.apply_pica(model, pk.PiCaConfig(rank=2, target_modules=["0", "2"]), progress=False)
    assert list(dict(model.named_children()))[-1] == "pica_bank"
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)  # M = 0: the base output
    randomize_m(model)
    assert not torch.equal(model(x), before)


def test_base_layer_path_accumulates_dm_in_fp32():
    """x in another dtype than W (autocast over a bf16 layer; quantized bases take the same path): the term is
    added to the base layer's output, and dM must be accumulated in fp32, not rounded to bf16 through autograd of
    a cast (it was, ~2e-3 relative, when the core wrote this path as plain F.linear calls)."""
    torch.manual_seed(0)
    layer = PiCaLinear(nn.Linear(64, 48).to(torch.bfloat16), rank=8)
    with torch.no_grad():
        layer.m().normal_()
    x = torch.randn(256, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    dy = torch.randn(y.shape).to(torch.bfloat16)
    y.backward(dy)
    t = (x.to(torch.bfloat16) @ layer.basis().T).double()  # the bf16 activations the term saw
    want = dy.double().T @ t
    rel = float((layer.m().grad.double() - want).abs().max() / want.abs().max())
    assert layer.m().grad.dtype == torch.float32
    assert rel < 1e-4, rel

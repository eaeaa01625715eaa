"""Adapter directories -> typed weights: PEFT's own saved adapters load unchanged, every refusal names its cause."""

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from quiver.adapters.bounds import MAX_ENTRY, MAX_GAIN, MAX_SCALE
from quiver.adapters.formats import CONFIG_FILE, WEIGHTS_FILE, load_adapter, save_bottleneck
from quiver.adapters.weights import AdapterKind, BottleneckSite, BottleneckWeights
from quiver.errors import InvalidArgument
from tests.support.models import save_tiny

KINDS = ("llama", "qwen2")


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    return {kind: save_tiny(kind, root) for kind in KINDS}


def peft_save(base: Path, config, out: Path) -> PeftModel:
    """PEFT's own get_peft_model(...).save_pretrained(out), on random (non-zero) adapter weights."""
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), config).eval()
        model.save_pretrained(out)
    return model


def base_config(base: Path):
    return AutoConfig.from_pretrained(base)


def edit_config(adapter: Path, **changes) -> None:
    config = json.loads((adapter / CONFIG_FILE).read_text())
    (adapter / CONFIG_FILE).write_text(json.dumps(config | changes))


def edit_tensors(adapter: Path, edit) -> None:
    tensors = load_file(adapter / WEIGHTS_FILE)
    edit(tensors)
    save_file(tensors, adapter / WEIGHTS_FILE)


# ---- LoRA -------------------------------------------------------------------------------------------------------

LORA_OPTIONS = {
    "list": dict(target_modules=["q_proj", "v_proj"]),
    "regex": dict(target_modules=r".*\.(k_proj|down_proj)"),
    "all_linear": dict(target_modules="all-linear"),
    "rslora": dict(target_modules=["o_proj", "up_proj"], r=8, lora_alpha=16, use_rslora=True),
    "patterns": dict(
        target_modules=["q_proj", "v_proj", "gate_proj"],
        rank_pattern={"v_proj": 2, r"layers\.1\.mlp\.gate_proj": 6},
        alpha_pattern={"q_proj": 3.0},
    ),
    "layers": dict(target_modules=["q_proj", "down_proj"], layers_to_transform=[1]),
    "layers_pattern": dict(target_modules=["k_proj"], layers_to_transform=0, layers_pattern="layers"),
    "exclude": dict(target_modules="all-linear", exclude_modules=["o_proj"]),
}


def peft_lora_modules(model: PeftModel) -> dict:
    return {
        name.removeprefix("base_model.model."): m
        for name, m in model.named_modules()
        if hasattr(m, "lora_A") and "default" in m.lora_A
    }


@pytest.mark.parametrize("option", sorted(LORA_OPTIONS))
@pytest.mark.parametrize("kind", KINDS)
def test_lora_matches_peft(bases, tmp_path, kind, option):
    options = dict(r=4, lora_alpha=8) | LORA_OPTIONS[option]
    config = LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **options)
    model = peft_save(bases[kind], config, tmp_path)
    weights = load_adapter(tmp_path, base_config(bases[kind]))
    expected = peft_lora_modules(model)
    assert weights.kind is AdapterKind.LORA
    assert set(weights.modules) == set(expected)
    for name, m in expected.items():
        got = weights.modules[name]
        assert torch.equal(got.a, m.lora_A["default"].weight)
        assert torch.equal(got.b, m.lora_B["default"].weight)
        assert got.scale == pytest.approx(m.scaling["default"])
    assert weights.max_rank == max(m.r["default"] for m in expected.values())
    assert weights.num_params == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)


def test_lora_semantics_match_peft_forward(bases, tmp_path):
    """`y += scale · (x·Aᵀ)·Bᵀ` on each module's output reproduces PEFT's logits."""
    config = LoraConfig(
        task_type="CAUSAL_LM", target_modules="all-linear", r=4, lora_alpha=12, use_rslora=True,
        init_lora_weights=False, rank_pattern={"down_proj": 2},
    )
    model = peft_save(bases["llama"], config, tmp_path)
    weights = load_adapter(tmp_path, base_config(bases["llama"]))
    plain = AutoModelForCausalLM.from_pretrained(bases["llama"]).eval()
    for name, m in weights.modules.items():
        plain.get_submodule(name).register_forward_hook(
            lambda _, args, y, m=m: y + m.scale * (args[0] @ m.a.T) @ m.b.T
        )
    ids = torch.tensor([[3, 14, 15, 92, 65]])
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, model(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_lora_fan_in_fan_out_does_not_transpose(bases, tmp_path):
    """fan_in_fan_out describes the base layer's storage (GPT-2's Conv1D), never lora_A/lora_B: PEFT keeps
    them as nn.Linear weights and, on Llama's nn.Linear, saves fan_in_fan_out=false. A hand-set `true` loads
    the same tensors, as PEFT itself loads them."""
    config = LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"], fan_in_fan_out=True, init_lora_weights=False)
    peft_save(bases["llama"], config, tmp_path)
    assert json.loads((tmp_path / CONFIG_FILE).read_text())["fan_in_fan_out"] is False
    edit_config(tmp_path, fan_in_fan_out=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(bases["llama"]), tmp_path)
    weights = load_adapter(tmp_path, base_config(bases["llama"]))
    for name, m in peft_lora_modules(reloaded).items():
        assert torch.equal(weights.modules[name].a, m.lora_A["default"].weight)
        assert torch.equal(weights.modules[name].b, m.lora_B["default"].weight)


def test_lora_keeps_saved_dtype(bases, tmp_path):
    peft_save(bases["llama"], LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"]), tmp_path)
    edit_tensors(tmp_path, lambda t: t.update({k: v.to(torch.bfloat16) for k, v in t.items()}))
    weights = load_adapter(tmp_path, base_config(bases["llama"]))
    assert {m.a.dtype for m in weights.modules.values()} == {torch.bfloat16}


# ---- prefix and prompt kinds --------------------------------------------------------------------------------------


@pytest.mark.parametrize("projection", [True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_prefix_matches_peft_get_prompt(bases, tmp_path, kind, projection):
    """The saved `prompt_embeddings` is the final [n, L·2·kv_heads·head_dim] (the MLP output when
    prefix_projection=true): reshaped, it equals the past_key_values PEFT builds from its encoder."""
    config = PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=5, prefix_projection=projection, encoder_hidden_size=24
    )
    model = peft_save(bases[kind], config, tmp_path)
    weights = load_adapter(tmp_path, base_config(bases[kind]))
    assert weights.kind is (AdapterKind.PREFIX_TUNING if projection else AdapterKind.P_TUNING_V2)
    assert weights.num_virtual_tokens == 5
    assert weights.prefix.shape == (2, 2, 5, 2, 16)  # [L, 2, n, kv_heads, head_dim]
    with torch.no_grad():
        cache = model.get_prompt(batch_size=1)
    for layer in range(2):
        keys, values = cache.layers[layer].keys[0], cache.layers[layer].values[0]  # [kv_heads, n, head_dim]
        torch.testing.assert_close(weights.prefix[layer, 0], keys.transpose(0, 1), rtol=0, atol=1e-6)
        torch.testing.assert_close(weights.prefix[layer, 1], values.transpose(0, 1), rtol=0, atol=1e-6)


PROMPT_CONFIGS = {
    "prompt_tuning": (
        AdapterKind.PROMPT_TUNING,
        lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    ),
    "p_tuning_mlp": (
        AdapterKind.P_TUNING,
        lambda: PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=24),
    ),
    "p_tuning_lstm": (
        AdapterKind.P_TUNING,
        lambda: PromptEncoderConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=24, encoder_reparameterization_type="LSTM"
        ),
    ),
}


@pytest.mark.parametrize("name", sorted(PROMPT_CONFIGS))
@pytest.mark.parametrize("kind", KINDS)
def test_prompt_kinds_match_peft_get_prompt(bases, tmp_path, kind, name):
    """PROMPT_TUNING saves its embedding table; P_TUNING saves its prompt encoder's output."""
    adapter_kind, make = PROMPT_CONFIGS[name]
    model = peft_save(bases[kind], make(), tmp_path)
    weights = load_adapter(tmp_path, base_config(bases[kind]))
    assert weights.kind is adapter_kind
    assert weights.num_virtual_tokens == 4
    with torch.no_grad():
        torch.testing.assert_close(weights.embeddings, model.get_prompt(batch_size=1)[0], rtol=0, atol=1e-6)


# ---- bottleneck ---------------------------------------------------------------------------------------------------


def random_bottleneck(*, layers, modules, size=8, hidden=64) -> BottleneckWeights:
    def site() -> BottleneckSite:
        return BottleneckSite(
            down=torch.randn(size, hidden),  # [bottleneck, hidden]
            down_bias=torch.randn(size),  # [bottleneck]
            up=torch.randn(hidden, size),  # [hidden, bottleneck]
            up_bias=torch.randn(hidden),  # [hidden]
        )

    return BottleneckWeights(
        sites={f"model.layers.{layer}.{module}": site() for layer in layers for module in modules},
        non_linearity="gelu",
        scaling=0.5,
    )


@pytest.mark.parametrize(
    "layers,modules", [((0, 1), ("self_attn.o_proj", "mlp.down_proj")), ((1,), ("mlp.down_proj",))]
)
def test_bottleneck_round_trip(bases, tmp_path, layers, modules):
    saved = random_bottleneck(layers=layers, modules=modules)
    save_bottleneck(tmp_path, weights=saved, base_model_name_or_path="tiny-llama")
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert config["peft_type"] == "BOTTLENECK" and config["layers_to_transform"] == list(layers)
    loaded = load_adapter(tmp_path, base_config(bases["llama"]))
    assert loaded.kind is AdapterKind.BOTTLENECK
    assert (loaded.non_linearity, loaded.scaling, loaded.bottleneck_size) == ("gelu", 0.5, 8)
    assert set(loaded.sites) == set(saved.sites)
    for name, site in saved.sites.items():
        got = loaded.sites[name]
        for field in ("down", "down_bias", "up", "up_bias"):
            assert torch.equal(getattr(got, field), getattr(site, field))
    assert loaded.num_params == len(saved.sites) * (2 * 8 * 64 + 8 + 64)


# ---- refusals -------------------------------------------------------------------------------------------------------


@pytest.fixture
def lora_dir(bases, tmp_path) -> Path:
    config = LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "k_proj"], r=4, init_lora_weights=False)
    peft_save(bases["llama"], config, tmp_path / "lora")
    return tmp_path / "lora"


@pytest.fixture
def prefix_dir(bases, tmp_path) -> Path:
    peft_save(bases["llama"], PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3), tmp_path / "prefix")
    return tmp_path / "prefix"


def refused(adapter: Path, base: Path, *fragments: str, **kwargs) -> None:
    """InvalidArgument with every fragment in its message, which names no server path (files are named
    relative to the adapter directory)."""
    with pytest.raises(InvalidArgument) as error:
        load_adapter(adapter, base_config(base), **kwargs)
    message = str(error.value)
    for fragment in fragments:
        assert fragment in message, message
    for server_path in {str(adapter.parent), str(adapter.resolve().parent)}:
        assert server_path not in message, message


@pytest.mark.parametrize("pickle", ["adapter_model.bin", "adapter.pt"])
def test_refuses_pickled_weights_without_unpickling(bases, lora_dir, monkeypatch, pickle):
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    (lora_dir / WEIGHTS_FILE).rename(lora_dir / pickle)
    refused(lora_dir, bases["llama"], pickle, "pickled weights are refused")


def test_refuses_missing_directory(bases, tmp_path):
    refused(tmp_path / "nowhere", bases["llama"], "nowhere", "does not exist")


def test_refuses_missing_config(bases, lora_dir):
    (lora_dir / CONFIG_FILE).unlink()
    refused(lora_dir, bases["llama"], CONFIG_FILE, "missing")


def test_refuses_missing_weights(bases, lora_dir):
    (lora_dir / WEIGHTS_FILE).unlink()
    refused(lora_dir, bases["llama"], WEIGHTS_FILE, "missing")


def test_refuses_malformed_json(bases, lora_dir):
    (lora_dir / CONFIG_FILE).write_text('{"peft_type": "LORA",')
    refused(lora_dir, bases["llama"], CONFIG_FILE, "malformed JSON")


def test_refuses_json_that_is_not_an_object(bases, lora_dir):
    (lora_dir / CONFIG_FILE).write_text("[1, 2]")
    refused(lora_dir, bases["llama"], CONFIG_FILE, "JSON object")


def test_refuses_truncated_safetensors(bases, lora_dir):
    data = (lora_dir / WEIGHTS_FILE).read_bytes()
    (lora_dir / WEIGHTS_FILE).write_bytes(data[: len(data) - 100])
    refused(lora_dir, bases["llama"], WEIGHTS_FILE, "not a valid safetensors file")


def test_refuses_symlink_outside_directory(bases, lora_dir, tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    (lora_dir / WEIGHTS_FILE).rename(outside)
    (lora_dir / WEIGHTS_FILE).symlink_to(outside)
    refused(lora_dir, bases["llama"], WEIGHTS_FILE, "outside the adapter directory")


def test_refuses_unknown_peft_type(bases, lora_dir):
    edit_config(lora_dir, peft_type="IA3")
    refused(lora_dir, bases["llama"], CONFIG_FILE, "unknown peft_type 'IA3'")


def test_refuses_other_task_type(bases, lora_dir):
    edit_config(lora_dir, task_type="SEQ_CLS")
    refused(lora_dir, bases["llama"], CONFIG_FILE, "task_type 'SEQ_CLS'")


def test_refuses_missing_tensor(bases, lora_dir):
    edit_tensors(lora_dir, lambda t: t.pop("base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"))
    refused(lora_dir, bases["llama"], WEIGHTS_FILE, "missing tensors", "layers.1.self_attn.k_proj.lora_B")


def test_refuses_extra_tensor(bases, lora_dir):
    name = "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"
    edit_tensors(lora_dir, lambda t: t.update({name: torch.zeros(4, 64)}))
    refused(lora_dir, bases["llama"], WEIGHTS_FILE, "unexpected tensors", "v_proj.lora_A")


def test_refuses_non_lora_tensor(bases, lora_dir):
    edit_tensors(lora_dir, lambda t: t.update({"base_model.model.model.norm.weight": torch.ones(64)}))
    refused(lora_dir, bases["llama"], WEIGHTS_FILE, "model.norm.weight", "not a LoRA tensor")


def test_refuses_wrong_shape_for_base(bases, lora_dir):
    edit_tensors(lora_dir, lambda t: t.update({k: torch.zeros(4, 96) for k in t if "lora_A" in k}))
    refused(lora_dir, bases["llama"], WEIGHTS_FILE, "has shape [4, 96]", "needs [4, 64]")


def test_refuses_lora_for_another_architecture(bases, lora_dir):
    with pytest.raises(InvalidArgument, match=r"needs \[4, 96\]"):
        load_adapter(lora_dir, AutoConfig.from_pretrained(bases["llama"], hidden_size=96, head_dim=24))


def test_refuses_rank_that_disagrees_with_config(bases, lora_dir):
    edit_config(lora_dir, rank_pattern={"k_proj": 2})
    refused(lora_dir, bases["llama"], "k_proj.lora_A.weight has shape [4, 64]", "needs [2, 64]")


def test_refuses_non_finite_values(bases, lora_dir):
    def poison(t):
        t["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"][3, 1] = float("nan")

    edit_tensors(lora_dir, poison)
    refused(lora_dir, bases["llama"], "q_proj.lora_B.weight", "non-finite")


@pytest.mark.parametrize("value", [float("inf"), float("-inf")])
def test_refuses_infinite_values(bases, lora_dir, value):
    def poison(t):
        t["base_model.model.model.layers.1.self_attn.k_proj.lora_A.weight"][0, 5] = value

    edit_tensors(lora_dir, poison)
    refused(lora_dir, bases["llama"], "k_proj.lora_A.weight", "non-finite")


def test_refuses_finite_entries_beyond_the_bound(bases, lora_dir):
    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"

    def huge(t):
        t[name][:2, 0] = -torch.finfo(torch.float32).max  # finite, but their sum is -inf
        t[name] = t[name].float()

    edit_tensors(lora_dir, huge)
    refused(lora_dir, bases["llama"], f"{WEIGHTS_FILE}: tensor {name} has an entry of magnitude 3.4e+38",
            f"above the bound of {MAX_ENTRY:g}")


def test_refuses_the_overflowing_lora_of_the_issue(bases, lora_dir):
    """lora_alpha=3e38 with B entries ±3e38: accepted before, and it overflows any dtype."""
    edit_config(lora_dir, lora_alpha=3e38)
    refused(lora_dir, bases["llama"], CONFIG_FILE, "the LoRA scale of model.layers.0.self_attn.k_proj is 7.5e+37",
            f"above the bound of {MAX_SCALE:g}")
    edit_config(lora_dir, lora_alpha=8)
    edit_tensors(lora_dir, lambda t: t.update({k: torch.where(v > 0, 3e38, -3e38) for k, v in t.items() if "lora_B" in k}))
    refused(lora_dir, bases["llama"], WEIGHTS_FILE, "lora_B.weight has an entry of magnitude 3e+38")


def test_refuses_a_lora_whose_gain_exceeds_the_bound(bases, lora_dir):
    """Every entry within bounds, but together they can multiply a layer's input by more than MAX_GAIN."""
    edit_tensors(lora_dir, lambda t: t.update({k: torch.full_like(v, 2.0) for k, v in t.items()}))
    # scale 8/4 = 2, ‖B‖ = 4 · 2, ‖A‖ = 64 · 2: a gain of 2048
    refused(lora_dir, bases["llama"], WEIGHTS_FILE, "the adapter on model.layers.0.self_attn.k_proj can multiply",
            "up to 2.05e+03", f"above the bound of {MAX_GAIN:g}")
    edit_tensors(lora_dir, lambda t: t.update({k: torch.full_like(v, 1.0) for k, v in t.items()}))  # 512: served
    assert load_adapter(lora_dir, base_config(bases["llama"])).modules


def test_bottleneck_bounds(bases, tmp_path):
    weights = random_bottleneck(layers=(0,), modules=("mlp.down_proj",))
    save_bottleneck(tmp_path, weights=weights)
    edit_config(tmp_path, scaling=-2e3)
    refused(tmp_path, bases["llama"], CONFIG_FILE, f"|scaling| <= {MAX_SCALE:g}", "-2000")
    edit_config(tmp_path, scaling=1e3)
    refused(tmp_path, bases["llama"], WEIGHTS_FILE, "the adapter on model.layers.0.mlp.down_proj can multiply")


def test_refuses_integer_tensors(bases, lora_dir):
    edit_tensors(lora_dir, lambda t: t.update({k: v.to(torch.int32) for k, v in t.items()}))
    refused(lora_dir, bases["llama"], WEIGHTS_FILE, "is I32")


def test_refuses_rank_zero(bases, lora_dir):
    edit_config(lora_dir, r=0)
    refused(lora_dir, bases["llama"], CONFIG_FILE, "r must be an integer >= 1, got 0")


def test_refuses_absurd_rank(bases, lora_dir):
    edit_config(lora_dir, r=40)  # k_proj is [64 -> 32]
    edit_tensors(lora_dir, lambda t: t.update({k: torch.zeros(v.shape[0] if "B" in k else 40, 40 if "B" in k else 64)
                                               for k, v in t.items()}))
    refused(lora_dir, bases["llama"], CONFIG_FILE, "rank 40 of model.layers.0.self_attn.k_proj", "exceeds min(in, out)")


@pytest.mark.parametrize(
    "option,message",
    [
        (dict(use_dora=True), "DoRA"),
        (dict(modules_to_save=["lm_head"]), "modules_to_save"),
        (dict(bias="all"), "bias='all'"),
        (dict(lora_bias=True), "a bias on lora_B"),
    ],
)
def test_refuses_unservable_lora_features(bases, tmp_path, option, message):
    config = LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"], **option)
    peft_save(bases["llama"], config, tmp_path)
    refused(tmp_path, bases["llama"], CONFIG_FILE, message, "cannot be served")


@pytest.mark.parametrize("target,module", [("lm_head", "'lm_head'"), ("embed_tokens", "'model.embed_tokens'")])
def test_refuses_targets_outside_decoder_linears(bases, tmp_path, target, module):
    peft_save(bases["llama"], LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", target]), tmp_path)
    refused(tmp_path, bases["llama"], WEIGHTS_FILE, f"adapts {module}", "decoder linear layers")


def test_refuses_modules_the_base_lacks(bases, lora_dir):
    names = {f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj", "o_proj")}
    refused(lora_dir, bases["llama"], "adapts 'model.layers.0.self_attn.k_proj'", module_names=names)


def test_refuses_modified_base_initialisation(bases, lora_dir):
    edit_config(lora_dir, init_lora_weights="pissa")
    refused(lora_dir, bases["llama"], "init_lora_weights='pissa'", "modified base weights")


def test_refuses_unknown_option_switched_on(bases, lora_dir):
    edit_config(lora_dir, some_future_option={"mode": 2}, another_option=None)
    refused(lora_dir, bases["llama"], "LoRA option some_future_option", "not supported")


def test_refuses_num_virtual_tokens_mismatch(bases, prefix_dir):
    edit_config(prefix_dir, num_virtual_tokens=4)
    refused(prefix_dir, bases["llama"], CONFIG_FILE, "num_virtual_tokens is 4 but prompt_embeddings has shape [3, 128]")


def test_refuses_prefix_for_another_architecture(bases, prefix_dir):
    with pytest.raises(InvalidArgument, match="num_layers is 2, this base model needs 3"):
        load_adapter(prefix_dir, AutoConfig.from_pretrained(bases["llama"], num_hidden_layers=3))


def test_refuses_prompt_for_another_hidden_size(bases, tmp_path):
    peft_save(bases["qwen2"], PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2), tmp_path)
    with pytest.raises(InvalidArgument, match="token_dim is 64, this base model's hidden size is 96"):
        load_adapter(tmp_path, AutoConfig.from_pretrained(bases["qwen2"], hidden_size=96, head_dim=16))


def test_refuses_bottleneck_with_unknown_non_linearity(bases, tmp_path):
    save_bottleneck(tmp_path, weights=random_bottleneck(layers=(0, 1), modules=("mlp.down_proj",)))
    edit_config(tmp_path, non_linearity="swish")
    refused(tmp_path, bases["llama"], CONFIG_FILE, "non_linearity must be one of", "'swish'")


def test_refuses_bottleneck_missing_a_layer(bases, tmp_path):
    save_bottleneck(tmp_path, weights=random_bottleneck(layers=(1,), modules=("self_attn.o_proj",)))
    edit_config(tmp_path, layers_to_transform=None)
    refused(tmp_path, bases["llama"], WEIGHTS_FILE, "missing tensors", "layers.0.attn_adapter.down.weight")


def test_refuses_invalid_target_regex(bases, lora_dir):
    edit_config(lora_dir, target_modules=r".*(q_proj")
    refused(lora_dir, bases["llama"], CONFIG_FILE, "target_modules holds '.*(q_proj', which is not a valid regular expression")


def test_refuses_layers_to_transform_with_string_targets(bases, lora_dir):
    edit_config(lora_dir, target_modules="all-linear", layers_to_transform=[0])
    refused(lora_dir, bases["llama"], CONFIG_FILE, "layers_to_transform/layers_pattern cannot be used")


def test_module_names_from_the_loaded_model(bases, lora_dir):
    model = AutoModelForCausalLM.from_pretrained(bases["llama"])
    weights = load_adapter(lora_dir, model.config, module_names={name for name, _ in model.named_modules()})
    assert len(weights.modules) == 4


@pytest.fixture
def bottleneck_dir(tmp_path) -> Path:
    save_bottleneck(tmp_path / "bottleneck", weights=random_bottleneck(layers=(0, 1), modules=("mlp.down_proj",)))
    return tmp_path / "bottleneck"


@pytest.mark.parametrize(
    "kind,changes,message",
    [
        ("lora", dict(peft_type=[]), "unknown peft_type []"),
        ("lora", dict(peft_type={"LORA": 1}), "unknown peft_type {'LORA': 1}"),
        ("bottleneck", dict(non_linearity=["gelu"]), "non_linearity must be one of"),
        ("bottleneck", dict(target_sites=[["attn"], "mlp"]), "target_sites must be distinct values"),
        ("bottleneck", dict(scaling=10**400), "|scaling| <= 1000"),
        ("lora", dict(lora_alpha=10**400), "lora_alpha must be a finite number, got 1000000"),
        ("lora", dict(alpha_pattern={"q_proj": -(10**400)}), "q_proj must be a finite number"),
        ("lora", dict(exclude_modules=[["o_proj"]]), "exclude_modules must be a list of names"),
        ("lora", dict(layers_to_transform=[0], layers_pattern=[1]), "layers_pattern must be a string or a list"),
    ],
)
def test_refuses_malformed_config_values(bases, lora_dir, bottleneck_dir, kind, changes, message):
    adapter = {"lora": lora_dir, "bottleneck": bottleneck_dir}[kind]
    edit_config(adapter, **changes)
    refused(adapter, bases["llama"], CONFIG_FILE, message)


@pytest.mark.parametrize(
    "text,message",
    [
        (b'{"peft_type": "LORA", "r": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
        (b'{"peft_type": "LORA", "r": 1' + b"0" * 5_000 + b"}", "malformed JSON (Exceeds the limit"),
        (b'{"peft_type": "LORA", "revision": "' + b"x" * (1 << 20) + b'"}', "larger than 1048576 bytes"),
        (b'{"peft_type": "\xff"}', "not UTF-8"),
    ],
    ids=["deep", "digits", "huge", "latin1"],
)
def test_refuses_malformed_config_files(bases, lora_dir, text, message):
    (lora_dir / CONFIG_FILE).write_bytes(text)
    refused(lora_dir, bases["llama"], f"{CONFIG_FILE}: ", message)

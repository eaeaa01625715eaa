"""AdapterKind is the one kind type; the spellings other layers see (proto values, metrics labels, trainer
methods, peft_type) are derived from it and must not change."""

from quiver.adapters.weights import PREFIX_KINDS, AdapterKind
from quiver.v1 import adapters_pb2


def test_every_proto_kind_is_one_adapter_kind():
    proto = {name for name in adapters_pb2.AdapterKind.keys() if name != "ADAPTER_KIND_UNSPECIFIED"}
    assert sorted(kind.proto_name for kind in AdapterKind) == sorted(proto)
    assert all(kind.proto_name == f"ADAPTER_KIND_{kind.value}" for kind in AdapterKind)


def test_user_visible_spellings_are_unchanged():
    assert [kind.label for kind in AdapterKind] == [kind.value.lower() for kind in AdapterKind]
    assert [kind.method for kind in AdapterKind] == ["lora", "adapter", "prefix", "ptuning-v2", "prompt", "ptuning"]
    assert [kind.peft_type for kind in AdapterKind] == [
        "LORA", "BOTTLENECK", "PREFIX_TUNING", "PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING",
    ]
    assert all(AdapterKind.of_method(kind.method) is kind for kind in AdapterKind)


def test_prefix_kinds_are_the_prompt_learning_kinds():
    assert set(PREFIX_KINDS) == set(AdapterKind) - {AdapterKind.LORA, AdapterKind.BOTTLENECK}

"""Client patterns in LoRA configs: PEFT's own selection, in bounded time, without stopping anyone else.

PEFT (`check_target_module_exists`, `get_pattern_key`) is the reference for which modules a config adapts
and with which rank and alpha; Python's `re` for what a pattern matches.
"""

import json
import re
import shutil
import threading
import time
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.other import get_pattern_key
from transformers import LlamaConfig, LlamaForCausalLM

from quiver.adapters import patterns
from quiver.adapters.config_values import ConfigValues
from quiver.adapters.formats import CONFIG_FILE
from quiver.adapters.lora_targets import LoraTargets
from quiver.adapters.patterns import MAX_PATTERN_CHARS, MAX_PATTERN_SIZE, BoundedPatterns
from quiver.engine.request import SamplingParams
from quiver.errors import InvalidArgument
from tests.support.harness import make_service

NUM_LAYERS = 12  # two-digit layer indices, so that "1" and "10" can be confused


def _module_names() -> list[str]:
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(vocab_size=160, hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=NUM_LAYERS, num_attention_heads=4, num_key_value_heads=2))
    return [name for name, _ in model.named_modules()]


NAMES = _module_names()  # every module of a real Llama, not only the linear layers
LINEARS = [n for n in NAMES if n.endswith("_proj")]
SLOW = r"(.*?){12}[A-Z]"  # polynomial backtracking: hours for `re` on a module name, never a match

SELECTIONS = {
    "list": dict(target_modules=["q_proj", "v_proj"]),
    "full-name": dict(target_modules=["model.layers.3.self_attn.q_proj", "mlp.up_proj"]),
    "dotted-suffix": dict(target_modules=["self_attn.o_proj", "1.mlp.down_proj"]),
    "regex": dict(target_modules=r".*\.(k_proj|down_proj)"),
    "regex-layers": dict(target_modules=r"model\.layers\.(1|10|11)\..*_proj"),
    "regex-counted": dict(target_modules=r".*layers\.\d{2}\.mlp\.[a-z]{2,4}_proj"),
    "regex-ignorecase": dict(target_modules=r"(?i).*Q_PROJ"),
    "regex-verbose": dict(target_modules=r"(?x) .* \. [qk]_proj  # queries and keys"),
    "regex-verbose-brace": dict(target_modules=r"(?x)model\.layers\.1{ 1 }\..* | .*\.k_proj"),
    "regex-lookbehind": dict(target_modules=r".*(?<!gate)(?<!up)_proj"),
    "regex-lookahead": dict(target_modules=r"model\.layers\.[0-3]\.self_attn\.(?!o_proj).*"),
    "regex-named-group": dict(target_modules=r"(?:.*\.)?(?P<kind>up|down)_proj"),
    "regex-conditional": dict(target_modules=r"(m)?(?(1)odel\.layers\.2\..*|x)"),
    "regex-backref": dict(target_modules=r"model\.layers\.(\d)\1\..*"),
    "regex-lazy-anchors": dict(target_modules=r"^.*?\bv_proj\Z"),
    "regex-fuzzy-looking-brace": dict(target_modules=r".*\.q_projx{e<=1}|.*\.o_proj"),  # `regex` reads a fuzzy match
    "regex-posix-looking-class": dict(target_modules=r".*[[:alpha:]]_proj|.*\.v_proj"),  # `regex`: a POSIX class
    "regex-possessive-atomic": dict(target_modules=r"(?>model)\.layers\.\d++\.mlp\.gate_proj"),
    "regex-unicode-escape": dict(target_modules=r".*\.\x71_\N{LATIN SMALL LETTER P}roj"),
    "exclude-regex": dict(target_modules=["q_proj", "down_proj"], exclude_modules=r".*\.1\d?\..*"),
    "exclude-list": dict(target_modules=r".*_proj", exclude_modules=["o_proj", "model.layers.0.mlp.up_proj"]),
    "layers": dict(target_modules=["q_proj", "down_proj"], layers_to_transform=[1, 10]),
    "layers-int": dict(target_modules=["k_proj"], layers_to_transform=3),
    "layers-pattern": dict(target_modules=["k_proj"], layers_to_transform=[0, 11], layers_pattern="layers"),
    "layers-pattern-regex": dict(target_modules=["v_proj"], layers_to_transform=[2], layers_pattern=["h", "lay.rs"]),
    "layers-pattern-miss": dict(target_modules=["v_proj", "model.layers.4.mlp.up_proj"], layers_to_transform=[2],
                                layers_pattern="blocks"),
}


def _peft_config(options: dict) -> SimpleNamespace:
    fields = dict(target_modules=None, exclude_modules=None, modules_to_save=None, target_parameters=None,
                  layers_to_transform=None, layers_pattern=None)
    return SimpleNamespace(**(fields | options))


@pytest.mark.parametrize("options", SELECTIONS.values(), ids=SELECTIONS.keys())
def test_selection_matches_peft(options):
    targets = LoraTargets(ConfigValues({"r": 4, **options}, CONFIG_FILE), num_layers=NUM_LAYERS)
    ours = [name for name in NAMES if targets.selects(name)]
    peft = [name for name in NAMES if check_target_module_exists(_peft_config(options), name)]
    assert ours == peft


def test_the_selections_are_varied():
    """The cases above do test something: each selects some modules and not others, and they differ."""
    chosen = [frozenset(n for n in NAMES if check_target_module_exists(_peft_config(o), n)) for o in SELECTIONS.values()]
    assert all(0 < len(c) < len(LINEARS) for c in chosen)
    assert len(set(chosen)) >= len(chosen) - 3


RANKS = {
    "suffix": dict(rank_pattern={"q_proj": 2, "mlp.down_proj": 6}, alpha_pattern={"v_proj": 3.0}),
    "regex": dict(rank_pattern={r"layers\.1\..*": 5, r"(up|gate)_proj": 7}, alpha_pattern={r"[kv]_proj": 1.5}),
    "first-key-wins": dict(rank_pattern={r"\d\.mlp\.down_proj": 3, "down_proj": 9, "o_proj|k_proj": 2}),
    "full-name": dict(rank_pattern={"model.layers.10.self_attn.v_proj": 8}, alpha_pattern={r"1\d?\.self_attn\..*": 0.5}),
    "dot-separated-tail": dict(rank_pattern={"ayers.3.mlp.up_proj": 2, r"proj": 1, r"3\.mlp\.up_proj": 5}),
}


@pytest.mark.parametrize("options", RANKS.values(), ids=RANKS.keys())
def test_rank_and_alpha_match_peft(options):
    r, alpha = 4, 16.0
    targets = LoraTargets(ConfigValues({"r": r, "lora_alpha": alpha, **options}, CONFIG_FILE), num_layers=NUM_LAYERS)
    rank_pattern, alpha_pattern = options.get("rank_pattern", {}), options.get("alpha_pattern", {})
    peft = {n: (rank_pattern.get(get_pattern_key(rank_pattern.keys(), n), r),
                alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), n), alpha)) for n in LINEARS}
    assert {n: targets.rank_alpha(n) for n in LINEARS} == peft
    assert len(set(peft.values())) > 1


TRICKY = [r"x{e<=1}", r"[[:alpha:]]+", r"(?x)a{ 2 }", r"a{,2}b", r"a{2", r"(?i)[^a-c]{1,3}", r"\{e<=1\}", r"(a|ab)(c|bcd)(d*)",
          r"(?s).\Z", r"[\]{}]+", r"(?a:\w)+", r"\w+\b.?", r"(?:a{0,2}){2,3}?", r"[a-]{2}|[-a]+", r"^$|x*"]
ALPHABET = "ab{}[]:xe<=1,2 éA-\n"


@settings(max_examples=300, deadline=None)
@given(pattern=st.one_of(st.sampled_from(TRICKY), st.text(alphabet=r"ab.*+?()[]{}|^$\-,12e<=:x", max_size=12)),
       texts=st.lists(st.text(alphabet=ALPHABET, max_size=8), min_size=1, max_size=8))
def test_matches_exactly_what_re_matches(pattern, texts):
    try:
        re.compile(pattern)
    except (re.error, OverflowError, RecursionError):
        return
    bounded = BoundedPatterns(ConfigValues({}, CONFIG_FILE))
    for text in texts:
        assert bounded.fullmatch("target_modules", pattern, text) == (re.fullmatch(pattern, text) is not None)
        ours, theirs = bounded.match("target_modules", pattern, text), re.match(pattern, text)
        assert (ours and (ours.span(), ours.groups())) == (theirs and (theirs.span(), theirs.groups()))


@pytest.mark.parametrize(
    "option,pattern,message",
    [
        ("target_modules", "q" * (MAX_PATTERN_CHARS + 1), f"longer than {MAX_PATTERN_CHARS} characters"),
        ("exclude_modules", r".*(q_proj", "not a valid regular expression"),
        ("target_modules", r"a{1000000}", f"expands to more than {MAX_PATTERN_SIZE} elements"),
        ("target_modules", r"((a{100}){100})?x", f"expands to more than {MAX_PATTERN_SIZE} elements"),
        ("exclude_modules", "(" * 1000 + ")" * 1000, "nested too deeply"),
    ],
)
def test_refuses_patterns_that_cannot_be_bounded(option, pattern, message):
    config = ConfigValues({"target_modules": ["q_proj"], option: pattern}, CONFIG_FILE)
    with pytest.raises(InvalidArgument, match=re.escape(message)) as error:
        [LoraTargets(config, num_layers=NUM_LAYERS).selects(n) for n in LINEARS]
    assert str(error.value).startswith(f"{CONFIG_FILE}: {option} holds ")


SLOW_CONFIGS = {
    "target_modules": dict(target_modules=SLOW),
    "exclude_modules": dict(target_modules=["q_proj"], exclude_modules=SLOW),
    "layers_pattern": dict(target_modules=["q_proj"], layers_to_transform=[1], layers_pattern=r"(.*?){12}\d{3}"),
    "rank_pattern": dict(target_modules=["q_proj"], rank_pattern={"v_proj": 2, SLOW: 4}),
    "alpha_pattern": dict(target_modules=["q_proj"], alpha_pattern={SLOW: 4}),
}


@pytest.mark.parametrize("option", SLOW_CONFIGS)
def test_a_backtracking_pattern_is_refused_within_the_budget_without_holding_the_gil(option, monkeypatch):
    monkeypatch.setattr(patterns, "MATCH_BUDGET_S", 2.0)
    ticks = []
    done = threading.Event()

    def tick():  # a Python thread: it runs only while the matcher lets go of the GIL
        while not done.is_set():
            ticks.append(time.monotonic())
            time.sleep(0.005)

    ticker = threading.Thread(target=tick)
    ticker.start()
    started = time.monotonic()
    try:
        targets = LoraTargets(ConfigValues({"r": 4, **SLOW_CONFIGS[option]}, CONFIG_FILE), num_layers=NUM_LAYERS)
        with pytest.raises(InvalidArgument, match=f"^{CONFIG_FILE}: {option}: matching .* took longer than 2 s"):
            for name in LINEARS:
                if targets.selects(name):
                    targets.rank_alpha(name)
    finally:
        done.set()
        ticker.join()
    took = time.monotonic() - started
    assert 2.0 <= took < 30
    gaps = [b - a for a, b in zip(ticks, ticks[1:])]
    assert len(ticks) > 20 and max(gaps) < 1.0, (len(ticks), max(gaps))  # holding the GIL: >= 2 s


def test_a_backtracking_pattern_loaded_while_victims_stream(model_path, zoo, tmp_path, monkeypatch):
    """The load fails with InvalidArgument after the budget; meanwhile the engine keeps stepping and the
    requests streaming through it get exactly the tokens they get without the load."""
    budget = 8.0
    monkeypatch.setattr(patterns, "MATCH_BUDGET_S", budget)
    steps: list[float] = []
    service = make_service(model_path, on_step=lambda outputs: steps.append(time.monotonic()))
    try:
        for name in ("lora", "prefix", "bottleneck"):
            service.load_adapter(name, zoo[name])
        bad = tmp_path / "bad"
        shutil.copytree(zoo["lora"], bad)
        config = json.loads((bad / CONFIG_FILE).read_text())
        (bad / CONFIG_FILE).write_text(json.dumps(config | {"target_modules": SLOW}))
        adapters = [None, "lora", "prefix", "bottleneck"]
        prompts = [[5 + i, 17, 9, 30 + i] for i in range(len(adapters))]
        params = SamplingParams(max_new_tokens=24, ignore_eos=True)

        def victims() -> list[list[int]]:
            return [c.token_ids for c in service.generate(prompts, params, adapter_ids=adapters)]

        reference = victims()
        outcome: dict[str, BaseException] = {}

        def load() -> None:
            try:
                service.load_adapter("bad", bad)
            except BaseException as e:  # noqa: BLE001 - reported below
                outcome["error"] = e

        loader = threading.Thread(target=load)
        started = time.monotonic()
        loader.start()
        rounds = []
        while loader.is_alive():  # victims stream for as long as the load runs
            rounds.append(victims())
        ended = time.monotonic()
        took = ended - started
        assert isinstance(outcome.get("error"), InvalidArgument), outcome
        assert str(outcome["error"]).startswith(f"{CONFIG_FILE}: target_modules: matching")
        assert budget <= took < 60
        assert rounds and all(r == reference for r in rounds)
        marks = [started, *(t for t in steps if started < t < ended), ended]  # the engine steps while the load runs
        gaps = [b - a for a, b in zip(marks, marks[1:])]
        assert len(marks) > 10 and max(gaps) < budget / 2, (len(marks), max(gaps))  # holding the GIL: >= budget
        assert "bad" not in {info.adapter_id for info in service.list_adapters()}
    finally:
        service.shutdown()

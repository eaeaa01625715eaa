"""Which modules a LoRA config adapts, and each one's rank and alpha: PEFT's rules, in bounded time.

PEFT's `check_target_module_exists` (peft/tuners/tuners_utils.py) and `get_pattern_key` (peft/utils/other.py),
restricted to the modules Quiver can adapt, with every client pattern matched by `BoundedPatterns`.
"""

from quiver.adapters.config_values import ConfigValues, short
from quiver.adapters.patterns import BoundedPatterns


class LoraTargets:
    def __init__(self, config: ConfigValues, *, num_layers: int) -> None:
        self.config = config
        self.num_layers = num_layers
        self.patterns = BoundedPatterns(config)

    def selects(self, name: str) -> bool:
        """Whether PEFT would put a LoRA on the module called `name` (a full name)."""
        config, patterns = self.config, self.patterns
        exclude = config.get("exclude_modules") or None  # PEFT: an empty value excludes nothing
        if exclude is not None and not (isinstance(exclude, str) or _names(exclude)):
            raise config.refuse(f"exclude_modules must be a list of names or a regex, got {short(exclude)}")
        if isinstance(exclude, str) and patterns.fullmatch("exclude_modules", exclude, name):
            return False
        if isinstance(exclude, list) and (name in exclude or any(name.endswith(f".{e}") for e in exclude)):
            return False
        targets = config.get("target_modules")
        if isinstance(targets, str):
            if config.get("layers_to_transform") is not None or config.get("layers_pattern") is not None:
                raise config.refuse("layers_to_transform/layers_pattern cannot be used when target_modules is a string")
            return targets.lower() == "all-linear" or patterns.fullmatch("target_modules", targets, name)
        if not _names(targets):
            raise config.refuse(f"target_modules must be a list of names, a regex or 'all-linear', got {short(targets)}")
        if name in targets:
            return True
        if not any(name.endswith(f".{t}") for t in targets):
            return False
        layers = config.layers("layers_to_transform", self.num_layers)
        if layers is None:
            return True
        found = config.get("layers_pattern") or []
        found = [found] if isinstance(found, str) else found
        if not _names(found):
            raise config.refuse("layers_pattern must be a string or a list of strings")
        regexes = [rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\." for p in found] or [r".*?\.[^.]*\.(?P<idx>\d+)\."]
        match = next((m for m in (patterns.match("layers_pattern", r, name) for r in regexes) if m), None)
        return match is not None and int(match["idx"]) in layers

    def rank_alpha(self, module: str) -> tuple[int, float]:
        """`r` and `lora_alpha`, each overridden by the first `rank_pattern`/`alpha_pattern` key that matches a
        dot-separated tail of the module name."""
        config = self.config
        rank, alpha = config.integer("r"), config.number("lora_alpha", default=8)
        rank_key = self._pattern_key("rank_pattern", module)
        alpha_key = self._pattern_key("alpha_pattern", module)
        if rank_key is not None:
            rank = ConfigValues(config.get("rank_pattern"), config.name).integer(rank_key)
        if alpha_key is not None:
            alpha = ConfigValues(config.get("alpha_pattern"), config.name).number(alpha_key)
        return rank, alpha

    def _pattern_key(self, option: str, module: str) -> str | None:
        keys = self.config.get(option) or {}
        if not isinstance(keys, dict):
            raise self.config.refuse(f"{option} must be an object, got a {type(keys).__name__}")
        return next((key for key in keys if self.patterns.match(option, rf"(.*\.)?({key})$", module)), None)


def _names(value) -> bool:
    """Whether `value` is a list of strings."""
    return isinstance(value, list) and all(isinstance(x, str) for x in value)

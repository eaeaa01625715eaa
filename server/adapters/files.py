"""An adapter directory's files, read safely: both files inside the directory, no pickles, and every tensor
checked (name, shape, dtype, bounded entries, bounded gain) as it is read. Messages name files relative to the
adapter directory."""

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from quiver.adapters import bounds
from quiver.errors import InvalidArgument

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
_DTYPES = {"F32", "BF16", "F16"}


def adapter_files(path: Path) -> tuple[Path, Path]:
    """The config and weights files of the adapter directory `path`, checked: both exist and, symlinks
    resolved, lie inside it; pickled weights are refused. Messages name files relative to the directory."""
    root = Path(path).resolve()
    if not root.is_dir():
        raise InvalidArgument(f"adapter directory {Path(path).name!r} does not exist")
    if not (root / WEIGHTS_FILE).exists():
        pickles = sorted(p.name for p in root.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise InvalidArgument(
                f"{pickles[0]}: pickled weights are refused (unpickling can run arbitrary code); "
                f"re-save the adapter with safe_serialization=True to get {WEIGHTS_FILE}"
            )
    return _inside(root, CONFIG_FILE), _inside(root, WEIGHTS_FILE)


def _inside(root: Path, name: str) -> Path:
    """root/name, which must exist and, symlinks resolved, stay inside root."""
    file = root / name
    if not file.is_file():
        raise InvalidArgument(f"{name}: missing")
    if not file.resolve().is_relative_to(root):
        raise InvalidArgument(f"{name}: a symlink to a file outside the adapter directory")
    return file


class Tensors:
    """The tensors of one safetensors file; each is checked (shape, dtype, bounded entries) as it is read.
    Messages name the file by its name (`self.name`)."""

    def __init__(self, file: Path):
        self.file, self.name = file, file.name

    def __enter__(self) -> "Tensors":
        try:
            self._handle = safe_open(str(self.file), framework="pt", device="cpu")
        except SafetensorError as e:
            raise InvalidArgument(f"{self.name}: not a valid safetensors file ({e})") from e
        except OSError as e:
            raise InvalidArgument(f"{self.name}: cannot be read ({e.strerror})") from e
        self.names = set(self._handle.keys())
        return self

    def __exit__(self, *exc) -> None:
        self._handle.__exit__(*exc)

    def expect_names(self, expected: set[str]) -> None:
        missing, extra = sorted(expected - self.names), sorted(self.names - expected)
        if missing:
            raise InvalidArgument(f"{self.name}: missing tensors {_few(missing)}")
        if extra:
            raise InvalidArgument(f"{self.name}: unexpected tensors {_few(extra)}")

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle.get_slice(name).get_shape())

    def read(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        saved = self.shape(name)
        if saved != shape:
            raise InvalidArgument(
                f"{self.name}: tensor {name} has shape {list(saved)}, this base model needs {list(shape)}"
            )
        dtype = self._handle.get_slice(name).get_dtype()
        if dtype not in _DTYPES:
            raise InvalidArgument(f"{self.name}: tensor {name} is {dtype}; expected one of {sorted(_DTYPES)}")
        tensor = self._handle.get_tensor(name)
        problem = bounds.entries_problem(tensor)
        if problem is not None:
            raise InvalidArgument(f"{self.name}: tensor {name} {problem}")
        return tensor

    def check_gain(self, module: str, gain: float) -> None:
        """InvalidArgument when the adapter on `module` can multiply its input by more than `bounds.MAX_GAIN`."""
        if not gain <= bounds.MAX_GAIN:
            raise InvalidArgument(
                f"{self.name}: the adapter on {module} can multiply its input by up to {gain:.3g} (scale·‖B‖·‖A‖), "
                f"above the bound of {bounds.MAX_GAIN:g} (docs/adapters.md)"
            )


def _few(names: list[str]) -> str:
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")

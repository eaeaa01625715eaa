"""Ways to spoil an adapter directory (a copy of a zoo adapter) for the bad-input table: each returns or is a
`mutate(directory)` that edits the files in place."""

import json
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def edit_config(**changes) -> Callable[[Path], None]:
    def mutate(path: Path) -> None:
        config = json.loads((path / CONFIG).read_text())
        (path / CONFIG).write_text(json.dumps({**config, **changes}))

    return mutate


def edit_tensors(change: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]) -> Callable[[Path], None]:
    def mutate(path: Path) -> None:
        save_file(change(load_file(path / WEIGHTS)), path / WEIGHTS)

    return mutate


def both(*mutations: Callable[[Path], None]) -> Callable[[Path], None]:
    def mutate(path: Path) -> None:
        for m in mutations:
            m(path)

    return mutate


def write(name: str, data: bytes) -> Callable[[Path], None]:
    return lambda path: (path / name).write_bytes(data)


def remove(name: str) -> Callable[[Path], None]:
    return lambda path: (path / name).unlink()


def with_entry(name: str, value: torch.Tensor) -> Callable[[dict], dict]:
    def change(tensors: dict) -> dict:
        t = tensors[name].clone()
        t.view(-1)[0] = value
        return {**tensors, name: t}

    return change


def lora_rank(rank: int) -> Callable[[Path], None]:
    """The zoo LoRA re-made at `rank`, with small random weights."""
    def change(tensors: dict) -> dict:
        return {
            k: (torch.randn(rank, t.shape[1]) if ".lora_A." in k else torch.randn(t.shape[0], rank)) * 0.01
            for k, t in tensors.items()
        }

    return both(edit_tensors(change), edit_config(r=rank, lora_alpha=rank))


def truncate(path: Path) -> None:
    data = (path / WEIGHTS).read_bytes()
    (path / WEIGHTS).write_bytes(data[: len(data) // 2])


def corrupt_header(path: Path) -> None:
    data = bytearray((path / WEIGHTS).read_bytes())
    data[8:40] = b"\xff" * 32  # the JSON header after its 8-byte length
    (path / WEIGHTS).write_bytes(bytes(data))


def absurd_header_length(path: Path) -> None:
    data = (path / WEIGHTS).read_bytes()
    (path / WEIGHTS).write_bytes((2**62).to_bytes(8, "little") + data[8:])


def rename_layer(change_from: str, change_to: str) -> Callable[[dict], dict]:
    return lambda tensors: {k.replace(change_from, change_to): t for k, t in tensors.items()}


def link_files_out(path: Path) -> None:
    """Every file of the adapter becomes a symlink to a copy outside the root."""
    outside = path.parent.parent / f"outside-{path.name}"
    shutil.copytree(path, outside)
    for f in path.iterdir():
        f.unlink()
        f.symlink_to(outside / f.name)

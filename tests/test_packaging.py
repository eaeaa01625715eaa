"""Installed, Quiver claims one import name, `quiver`: the repository's folders (server/, kernels/, trainer/,
deploy/, protos/quiver/v1/) are mapped under it by pyproject.toml's package-dir. No generic top-level package
(`server`, `kernels`, ...) is installed or imported; `kernels` in particular is also the name of Hugging Face's
hub-kernels package, which transformers probes for."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from quiver.kernels import native

ROOT = Path(__file__).resolve().parents[1]
GENERIC = ("server", "kernels", "trainer", "deploy")

IMPORTS = """
import sys
import quiver.api.server, quiver.cli, quiver.deploy.ray_serve, quiver.trainer.cli, quiver.trainer.pipeline
from transformers.utils import import_utils
print(sorted({name.split(".")[0] for name in sys.modules} & {"server", "kernels", "trainer", "deploy"}))
print(import_utils.is_kernels_available())
"""


def test_the_wheel_holds_one_top_level_package(tmp_path):
    source = tmp_path / "source"  # a copy of what the wheel is built from: the build leaves build/ beside it
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for folder in ("server", "kernels", "trainer", "deploy", "protos"):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(tmp_path), str(source)],
        capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = tmp_path.glob("quiver-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top == {"quiver"}
    for module in ("quiver/__init__.py", "quiver/engine/engine.py", "quiver/kernels/lora.py", "quiver/trainer/cli.py",
                   "quiver/deploy/ray_serve.py", "quiver/v1/__init__.py"):
        assert module in names
    for source in [*native._SOURCES, *native._HEADERS]:  # what the CPU kernels' build reads
        assert f"quiver/kernels/{source}" in names


def test_importing_server_trainer_and_deployment_loads_no_generic_package(tmp_path):
    """As an installed user runs it: from a directory of their own (from the repository's root, its folders
    are on the path under their own names, as any folder there is)."""
    out = subprocess.run([sys.executable, "-c", IMPORTS], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["[]", "False"]

"""Compile protos/quiver/v1/*.proto into Python modules beside them (run by `make protos`).

The modules are generated, not committed, so that they always match the protobuf runtime installed next
to the grpcio-tools that made them. protoc names them after the proto package, `quiver.v1`, which is where
the installed package puts this folder (pyproject.toml's package-dir), so they import each other, and their
messages record their module (Ray Serve's proxy pickles them), as generated.

    python protos/generate.py
"""

import shutil
import sys
import tempfile
from importlib.resources import files
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent
PACKAGE_DIR = ROOT / "quiver" / "v1"


def generate() -> list[Path]:
    protos = sorted(PACKAGE_DIR.glob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc", f"-I{ROOT}", f"-I{files('grpc_tools') / '_proto'}",
            f"--python_out={tmp}", f"--pyi_out={tmp}", f"--grpc_python_out={tmp}", *map(str, protos),
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed (see above)")
        written = []
        for made in sorted((Path(tmp) / "quiver" / "v1").iterdir()):
            target = PACKAGE_DIR / made.name
            shutil.move(made, target.with_suffix(target.suffix + ".tmp"))
            shutil.move(target.with_suffix(target.suffix + ".tmp"), target)  # readers never see half a module
            written.append(target)
    return written


if __name__ == "__main__":
    for path in generate():
        print(path.relative_to(ROOT.parent), file=sys.stderr)

"""Compile protos/quiver/v1/*.proto into the Python modules of server/api/gen (run by `make protos`).

The modules are generated, not committed, so that they always match the protobuf runtime installed next
to the grpcio-tools that made them. protoc writes `from quiver.v1 import x_pb2`; those imports are
rewritten to `from server.api.gen import x_pb2`, where the modules live, and so is the module name the
message classes record (`__module__`), so that messages can be pickled (Ray Serve's proxy pickles them).

    python protos/generate.py
"""

import re
import shutil
import sys
import tempfile
from importlib.resources import files
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent
PACKAGE_DIR = ROOT / "quiver" / "v1"
OUT = ROOT.parent / "server" / "api" / "gen"
_IMPORT = re.compile(r"^from quiver\.v1 import ", re.MULTILINE)
_MODULE = re.compile(r"'quiver\.v1\.(\w+_pb2)'")


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
            text = _MODULE.sub(r"'server.api.gen.\1'", _IMPORT.sub("from server.api.gen import ", made.read_text()))
            target = OUT / made.name
            tmp_target = target.with_suffix(target.suffix + ".tmp")
            tmp_target.write_text(text)
            shutil.move(tmp_target, target)  # readers never see half a module
            written.append(target)
    return written


if __name__ == "__main__":
    for path in generate():
        print(path.relative_to(ROOT.parent), file=sys.stderr)

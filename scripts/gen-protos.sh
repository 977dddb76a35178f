#!/usr/bin/env bash
# Regenerates meshca/api/_proto/*_pb2*.py from the .proto contracts beside them.
# Run from the repository root after editing a .proto file; the output is committed.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
"$py" -m grpc_tools.protoc -I . \
  --python_out=. --grpc_python_out=. --pyi_out=. \
  meshca/api/_proto/istioca.proto meshca/api/_proto/meshca.proto \
  meshca/api/_proto/workload.proto

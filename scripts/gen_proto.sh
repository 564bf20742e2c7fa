#!/usr/bin/env bash
# Regenerate fedq/wire/pb/*_pb2*.py from proto/. The output is committed; tests/wire/test_proto_fresh.py
# fails when it is stale. Usage: scripts/gen_proto.sh [OUT_ROOT]   (default: the repository root)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-.}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$out/fedq/wire/pb"
"$PY" -m grpc_tools.protoc -Iproto --python_out="$out" --grpc_python_out="$out" --pyi_out="$out" \
  proto/fedq/wire/pb/tensor.proto proto/fedq/wire/pb/service.proto
touch "$out/fedq/wire/pb/__init__.py"

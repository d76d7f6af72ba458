#!/usr/bin/env bash
# Regenerate the checked-in gRPC code from the repository root:  bash protos/generate.sh
# (tests/test_protos.py fails when the checked-in files differ from a fresh run)
set -euo pipefail
cd "$(dirname "$0")/.."
python -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. --pyi_out=. protos/reward.proto protos/control.proto protos/env.proto

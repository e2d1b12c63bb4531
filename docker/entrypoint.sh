#!/usr/bin/env bash
# Start Triton on the fusionrank repository with a serving profile: gpu (TensorRT, default), onnx_gpu or cpu.
# For the gpu profile, engines are built on this node if missing, and the pre-flight check refuses to serve
# engines built for another GPU or TensorRT version unless FUSIONRANK_FORCE=1. Version-compatible engines get the
# Triton backend config they need (`fusionrank check --print-backend-config`).
set -euo pipefail
profile="${1:-gpu}"
repo="${FUSIONRANK_REPOSITORY:-/opt/fusionrank/model_repository}"
args=(--model-repository="$repo" --grpc-port=8001 --http-port=8000 --metrics-port=8002
      --allow-metrics=true --strict-readiness=true --exit-on-error=true)
case "$profile" in
  gpu)
    if ! ls "$repo"/*/1/model.plan >/dev/null 2>&1; then
      fusionrank build-engines --repository "$repo"
    fi
    while IFS= read -r value || [ -n "$value" ]; do args+=(--backend-config="$value"); done \
      < <(fusionrank check --repository "$repo" --print-backend-config)
    if ! fusionrank check --repository "$repo"; then
      [ "${FUSIONRANK_FORCE:-0}" = 1 ] || { echo "engine pre-flight failed; rebuild or set FUSIONRANK_FORCE=1" >&2; exit 1; }
    fi ;;
  onnx_gpu|cpu) args+=(--model-config-name="$profile") ;;
  *) echo "unknown profile '$profile' (gpu | onnx_gpu | cpu)" >&2; exit 2 ;;
esac
exec tritonserver "${args[@]}" "${@:2}"

#!/usr/bin/env bash
# `make gpu-check`, or `bash deploy/gpu-check.sh` where make is missing (the NGC Triton image): the whole GPU check
# as one command that ends by itself within 10 minutes, install included, on a bare GPU node, inside the NGC image,
# or on a machine without a GPU (every GPU step reported as skipped). Runbook: docs/gpu.md.
#
# 1. The driver first (standard library only, nothing installed yet): tensorrt-cu13 and onnxruntime-gpu (CUDA 13)
#    need a driver that runs CUDA 13 (R580+). On an older one (R535/R550/R570) they are not downloaded; the report
#    says why and skips their steps.
# 2. A lean environment with the serving and gpu extras only, never [dev] (no torch CUDA build, Locust, pytriton):
#    a venv in $GPU_CHECK_ENV (.venv-gpu), or, where python3-venv is missing (NGC images), `pip install --target`
#    into $GPU_CHECK_ENV/site on PYTHONPATH. The export extra (torch's CPU build) only when the repository has no
#    exported models. onnxruntime-gpu replaces onnxruntime where it installs. Bounded by $GPU_CHECK_INSTALL_S.
# 3. `python -m fusionrank_cli gpu-check` with what is left of the time limit: docs/gpu/<date>-<gpu>/ either way.
#
# GPU_CHECK_PYTHON=/path/to/python skips step 2 and runs the check with that interpreter as it is.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

LIMIT_S=${GPU_CHECK_LIMIT_S:-570}
INSTALL_S=${GPU_CHECK_INSTALL_S:-300}
ENV_DIR=${GPU_CHECK_ENV:-.venv-gpu}
OUT=${GPU_CHECK_OUT:-docs/gpu}
REPOSITORY=${GPU_CHECK_REPOSITORY:-model_repository}
PYTHON=${PYTHON:-python3}
TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
started=$SECONDS
target=()

say() { printf 'gpu-check: %s\n' "$*" >&2; }

"$PYTHON" -m export.node.cuda_driver
case $? in
  0) extras="serve,gpu"; gpu_runtime=1 ;;
  2) extras="serve"; gpu_runtime=0
     say "TensorRT and onnxruntime-gpu are not installed: this driver cannot run their CUDA (see above)" ;;
  *) extras="serve"; gpu_runtime=0 ;;
esac
if [ ! -f "$REPOSITORY/fusion_ranker/1/model.onnx" ] || [ ! -f "$REPOSITORY/fusion_ranker/1/golden.npz" ]; then
  extras="$extras,export"  # prepare-repository exports the models: torch from its CPU index, not the CUDA build
fi

pip_install() {  # pip_install ARGS...: bounded by what is left of the install time
  local left=$(( INSTALL_S - (SECONDS - started) ))
  if [ "$left" -lt 10 ]; then say "no install time left for: $*"; return 1; fi
  timeout "$left" "$py" -m pip install -q --disable-pip-version-check "${target[@]}" "$@"
}

if [ -n "${GPU_CHECK_PYTHON:-}" ]; then
  py=$GPU_CHECK_PYTHON
else
  if [ -x "$ENV_DIR/bin/python" ] || "$PYTHON" -m venv "$ENV_DIR" >/dev/null 2>&1; then
    py="$ENV_DIR/bin/python"
  else
    say "no python3-venv here: installing with pip --target $ENV_DIR/site"
    py=$PYTHON
    target=(--upgrade --target "$ENV_DIR/site")
    export PYTHONPATH="$PWD/$ENV_DIR/site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  stamp="$ENV_DIR/.installed-${extras//,/-}"
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    say "installing .[$extras] into $ENV_DIR (lean: no [dev])"
    if pip_install --extra-index-url "$TORCH_CPU_INDEX" ".[$extras]"; then
      touch "$stamp"
    else
      say "installing .[$extras] failed or ran out of time: the steps that need it will say why"
    fi
    if [ "$gpu_runtime" = 1 ]; then
      [ ${#target[@]} -eq 0 ] && "$py" -m pip uninstall -y -q onnxruntime >/dev/null 2>&1
      pip_install "onnxruntime-gpu[cuda,cudnn]" || {
        say "onnxruntime-gpu did not install: the onnxruntime-cuda step will be skipped"
        pip_install onnxruntime >/dev/null 2>&1 || true
      }
    fi
  fi
fi

budget=$(( LIMIT_S - (SECONDS - started) ))
[ "$budget" -lt 30 ] && budget=30
say "running the check with $budget s left of $LIMIT_S s"
exec "$py" -m fusionrank_cli gpu-check --budget-s "$budget" --out "$OUT" --repository "$REPOSITORY"

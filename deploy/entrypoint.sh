#!/usr/bin/env bash
# fusionrank image entrypoint (after NVIDIA's /opt/nvidia/nvidia_entrypoint.sh).
#
#   gpu | onnx_gpu | cpu   start Triton on $FUSIONRANK_REPOSITORY with that serving profile; extra arguments go to
#                          tritonserver. gpu refuses to start without engines or when `fusionrank check` finds a
#                          mismatch (FUSIONRANK_FORCE=1 overrides; engines are never built here).
#   build-engines          the engine Job: build TensorRT engines once for this GPU type and TensorRT version into
#                          $ENGINE_STORE/$ENGINE_SET; a set that already passes `fusionrank check` is kept.
#   fetch-engines          the init container: copy the image's repository to $FUSIONRANK_REPOSITORY, add the
#                          engines of $ENGINE_STORE/$ENGINE_SET, and refuse (exit 1) unless `fusionrank check` passes.
# In gpu mode, version-compatible engines get the Triton backend config they need (`fusionrank check
# --print-backend-config`).
# Every serving mode runs what `fusionrank serve --print-triton-args` prints for the spec: explicit model control
# loading the route and its members (not the reference ensemble), model control, shared memory, trace and logging
# restricted to callers sending the header fusionrank-admin-key with $FUSIONRANK_ADMIN_KEY (a Secret; without it a
# random key is drawn and those APIs are shut to everyone), and gRPC over TLS when $FUSIONRANK_GRPC_TLS_DIR holds
# tls.crt and tls.key (client-ca.crt too: mutual TLS). Triton takes the key only as an argument: `ps` inside this
# container shows it, so nothing else should run here (the cache's redis-server below is ours, same user).
# With `serving.cache.server_wide` (the default), every serving mode starts the spec's server-wide embedding cache
# first, as `fusionrank serve` does: see the end of this file.
set -euo pipefail
mode="${1:-gpu}"
image_repo="${FUSIONRANK_IMAGE_REPOSITORY:-/opt/fusionrank/model_repository}"
repo="${FUSIONRANK_REPOSITORY:-$image_repo}"
engines="${ENGINE_STORE:-/engines}/${ENGINE_SET:-default}"

# Copy each engine model's plan and manifest (`<model>/1/{model.plan,manifest.json}`) from $1 to $2.
copy_engines() {
  local from="$1" to="$2" plan dir
  shopt -s nullglob
  for plan in "$from"/*/1/model.plan; do
    dir="${plan%/model.plan}"
    mkdir -p "$to/${dir#"$from"/}"
    cp "$plan" "$dir/manifest.json" "$to/${dir#"$from"/}/"
  done
}

has_engines() { compgen -G "$1/*/1/model.plan" > /dev/null; }

# The image's repository plus the engine set, in $repo; refuse (exit 1) unless `fusionrank check` passes.
fetch_engines() {
  has_engines "$engines" || { echo "no engines in $engines: run the engine Job for this GPU type first" >&2; exit 1; }
  cp -r "$image_repo/." "$repo/"
  copy_engines "$engines" "$repo"
  fusionrank check --repository "$repo" || { echo "engines in $engines refused: rebuild them with the engine Job" >&2
                                              exit 1; }
}

case "$mode" in
  build-engines)
    work="$(mktemp -d)"
    cp -r "$image_repo/." "$work/"
    if has_engines "$engines"; then
      copy_engines "$engines" "$work"
      if fusionrank check --repository "$work"; then
        echo "engines in $engines match this GPU, TensorRT and image: nothing to build"; exit 0
      fi
      echo "engines in $engines do not match (see above): rebuilding" >&2
    fi
    fusionrank build-engines --repository "$work"
    fusionrank check --repository "$work"
    # Written beside, then swapped in, so a pod never fetches half a set.
    rm -rf "$engines.new" && mkdir -p "$engines.new"
    copy_engines "$work" "$engines.new"
    rm -rf "$engines.old" && { [ ! -e "$engines" ] || mv "$engines" "$engines.old"; }
    mv "$engines.new" "$engines" && rm -rf "$engines.old"
    echo "engines written to $engines"; exit 0 ;;
  fetch-engines) fetch_engines; exit 0 ;;
  gpu)
    # Compose has no init containers: with ENGINE_SET named, the serving container fetches the set itself.
    if [ -n "${ENGINE_SET:-}" ] && [ "$repo" != "$image_repo" ]; then fetch_engines; fi
    has_engines "$repo" || { echo "no TensorRT engines in $repo: run the engine Job (or fetch-engines)" >&2; exit 1; }
    config=()
    while IFS= read -r value || [ -n "$value" ]; do config+=(--backend-config="$value"); done \
      < <(fusionrank check --repository "$repo" --print-backend-config)
    if ! fusionrank check --repository "$repo"; then
      [ "${FUSIONRANK_FORCE:-0}" = 1 ] || { echo "engine pre-flight failed; rebuild or set FUSIONRANK_FORCE=1" >&2; exit 1; }
    fi ;;
  onnx_gpu|cpu) config=(--model-config-name="$mode") ;;
  *) echo "unknown mode '$mode' (gpu | onnx_gpu | cpu | build-engines | fetch-engines)" >&2; exit 2 ;;
esac

policy="$(fusionrank serve --print-triton-args)"
mapfile -t policy_args <<< "$policy"
# The key is in the arguments now; the Python-backend models need not inherit it.
unset FUSIONRANK_ADMIN_KEY

# The server-wide embedding cache: `fusionrank local-cache` starts the redis-server `fusionrank serve` starts (one
# source for its flags: fusionrank/server/local_cache.py), waits until its socket answers PING (at most
# $FUSIONRANK_LOCAL_CACHE_WAIT_S seconds), puts its URL in $FUSIONRANK_LOCAL_CACHE for the Python-backend stubs, and
# then execs tritonserver. Each step is an exec, so tritonserver keeps this shell's PID: it is the container's PID 1
# (NVIDIA's entrypoint execs this script), Kubernetes' SIGTERM reaches Triton itself, which drains in-flight requests
# within its exit timeout as before, and no shell stays behind to forward signals or swallow the exit status.
# redis-server is Triton's child, armed with PR_SET_PDEATHSIG: it keeps answering while Triton drains and gets SIGTERM
# when Triton's process ends, however it ends (SIGKILL after the grace period included); in its own PID namespace
# the container's end kills it anyway. A redis-server that dies while Triton runs is not restarted: route instances
# count store errors and encode instead (latency, never failed requests). No fallback when redis-server is missing
# or silent: the container exits 2 naming the socket, since in-process LRUs would let route instances answer one
# request differently; a spec that wants them says `server_wide: false` (then nothing is started).
# Summaries give the p99 the alerts read; the exit timeout must stay below the pod's termination grace period.
exec fusionrank local-cache --wait-s "${FUSIONRANK_LOCAL_CACHE_WAIT_S:-10}" -- \
  tritonserver --model-repository="$repo" --grpc-port=8001 --http-port=8000 --metrics-port=8002 \
  --allow-metrics=true --metrics-config=summary_latencies=true --strict-readiness=true --exit-on-error=true \
  --exit-timeout-secs="${FUSIONRANK_EXIT_TIMEOUT_S:-30}" "${config[@]}" "${policy_args[@]}" "${@:2}"

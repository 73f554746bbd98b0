#!/usr/bin/env bash
# Run the MAP image on a folder of DICOM studies, offline, the way a clinical host runs it:
# no network, the input mounted read-only, the output and logs folders mounted writable, the app
# as uid 1000. The exit status is the app's (0 done, 2 bad input, 1 internal error).
#
# Usage: tools/run_map.sh [options] INPUT_FOLDER OUTPUT_FOLDER [-- APP_ARGS...]
#   --image IMAGE     the image (default localhost/codegraph3d-map:<app.yaml version>)
#   --logs DIR        where the container writes its log files (default OUTPUT_FOLDER/../<name>-logs)
#   --config FILE     a codegraph3d configuration to use (mounted read-only; e.g. tools/demo_config.yaml)
#   --weights PATH    DINOv2 weights to mount into the models folder (a dinov2-large/ folder or .pth)
#   --gpu             pass the host's NVIDIA GPUs in (CDI: needs nvidia-container-toolkit's CDI spec)
#   --verb VERB       run (default), show, env or extract (extract writes into OUTPUT_FOLDER)
# Extra podman options can be given in PODMAN_RUN_OPTS.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
version=$(sed -n 's/^  version: *//p' "$root/app.yaml" | head -n1)
image="localhost/codegraph3d-map:${version:-latest}"
logs="" config="" weights="" gpu=0 verb=run
positional=()
while [ $# -gt 0 ]; do
  case "$1" in
    --image) image="$2"; shift 2 ;;
    --logs) logs="$2"; shift 2 ;;
    --config) config="$2"; shift 2 ;;
    --weights) weights="$2"; shift 2 ;;
    --gpu) gpu=1; shift ;;
    --verb) verb="$2"; shift 2 ;;
    -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    --) shift; break ;;
    -*) echo "run_map: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) positional+=("$1"); shift ;;
  esac
done
app_args=("$@")
if [ "${#positional[@]}" -ne 2 ]; then
  echo "run_map: expected INPUT_FOLDER and OUTPUT_FOLDER (see --help)" >&2; exit 2
fi
input="${positional[0]}" output="${positional[1]}"
[ -d "$input" ] || { echo "run_map: the input folder $input does not exist" >&2; exit 2; }
[ -z "$config" ] || [ -f "$config" ] || { echo "run_map: the configuration $config does not exist" >&2; exit 2; }
[ -z "$weights" ] || [ -e "$weights" ] || { echo "run_map: the weights $weights do not exist" >&2; exit 2; }
podman image exists "$image" || { echo "run_map: no image $image; build it with tools/build_map.sh" >&2; exit 2; }
mkdir -p "$output"
output="$(cd "$output" && pwd)"
[ -n "$logs" ] || logs="$(dirname "$output")/$(basename "$output")-logs"
mkdir -p "$logs"
logs="$(cd "$logs" && pwd)"
input="$(cd "$input" && pwd)"

options=(--rm --runtime runc --network none
         --ulimit nofile=1024:1024 --ulimit nproc=4096:4096 --ulimit stack=33554432:33554432
         --volume "$input:/var/holoscan/input:ro"
         --volume "$logs:/var/holoscan/logs")
case "$verb" in
  extract) options+=(--volume "$output:/var/run/holoscan/export") ;;
  *) options+=(--volume "$output:/var/holoscan/output") ;;
esac
# The app runs as uid 1000. Rootful podman maps it to host uid 1000, which must be able to write
# the output and logs folders; rootless podman maps the caller's own uid onto it instead.
if [ "$(id -u)" = 0 ]; then
  chown 1000:1000 "$output" "$logs"
else
  options+=(--userns "keep-id:uid=1000,gid=1000")
fi
if [ -n "$config" ]; then
  options+=(--volume "$(cd "$(dirname "$config")" && pwd)/$(basename "$config"):/var/holoscan/codegraph3d.yaml:ro"
            --env CODEGRAPH3D_CONFIG=/var/holoscan/codegraph3d.yaml)
fi
if [ -n "$weights" ]; then
  weights_abs="$(cd "$(dirname "$weights")" && pwd)/$(basename "$weights")"
  options+=(--volume "$weights_abs:/opt/holoscan/models/$(basename "$weights"):ro")
fi
[ "$gpu" = 0 ] || options+=(--device nvidia.com/gpu=all)
# shellcheck disable=SC2206 # word splitting of the user's extra options is intended
[ -z "${PODMAN_RUN_OPTS:-}" ] || options+=(${PODMAN_RUN_OPTS})

exec podman run "${options[@]}" "$image" "$verb" "${app_args[@]}"

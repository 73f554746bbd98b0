#!/usr/bin/env bash
# Build the MAP container image with podman, without a Docker engine and without the MONAI Deploy
# packager (which downloads its base images): a Debian base made by debootstrap from the apt
# mirror, imported into podman, then map/Containerfile built on it with chroot isolation.
# Only the apt mirror and PyPI are reached, and only at build time; the image runs offline.
#
# Usage: tools/build_map.sh [options]
#   --tag IMAGE          image name (default localhost/codegraph3d-map:<app.yaml version>)
#   --weights PATH       bake DINOv2 weights into /opt/holoscan/models: a Hugging Face folder
#                        (dinov2-large/) or the official .pth; default none (mount them at run time)
#   --gpu                the GPU variant: PyPI's CUDA 13.0 build of torch 2.13.0 instead of the CPU
#                        wheel (about 3 GB more; default tag suffix -cuda); run it with run_map.sh --gpu
#   --mirror URL         Debian mirror for debootstrap (default: this machine's apt source)
#   --cache DIR          base rootfs, build context and pip cache (default work/map-build)
#   --rebuild-base       make the Debian base again even when the image exists
#   --save FILE          also write the image as an OCI archive (podman save)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

version=$(sed -n 's/^  version: *//p' app.yaml | head -n1)
tag=""
weights="" variant=cpu mirror="" cache="work/map-build" rebuild_base=0 save=""
base_image="localhost/codegraph3d-base:bookworm"
while [ $# -gt 0 ]; do
  case "$1" in
    --tag) tag="$2"; shift 2 ;;
    --weights) weights="$2"; shift 2 ;;
    --gpu) variant=cuda; shift ;;
    --mirror) mirror="$2"; shift 2 ;;
    --cache) cache="$2"; shift 2 ;;
    --rebuild-base) rebuild_base=1; shift ;;
    --save) save="$2"; shift 2 ;;
    -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "build_map: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

[ -n "$tag" ] || { tag="localhost/codegraph3d-map:${version:-latest}"; [ "$variant" = cpu ] || tag="$tag-cuda"; }
for tool in podman debootstrap; do
  command -v "$tool" >/dev/null 2>&1 || {
    echo "build_map: $tool is not installed; install it with: apt-get install -y podman debootstrap" >&2; exit 2; }
done
[ "$(id -u)" = 0 ] || { echo "build_map: debootstrap needs root (run as root or with sudo)" >&2; exit 2; }
if [ -n "$weights" ] && [ ! -e "$weights" ]; then
  echo "build_map: --weights $weights does not exist (a dinov2-large/ folder or a .pth file)" >&2; exit 2
fi
ca_bundle="${PIP_CERT:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}"
[ -f "$ca_bundle" ] || { echo "build_map: no CA bundle at $ca_bundle (set PIP_CERT)" >&2; exit 2; }
if [ -z "$mirror" ]; then
  mirror=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n1)
  [ -n "$mirror" ] || mirror=$(awk '$1=="deb" && $3=="bookworm" {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
  [ -n "$mirror" ] || mirror="http://deb.debian.org/debian"
fi
mkdir -p "$cache"
cache="$(cd "$cache" && pwd)"
started=$(date +%s)

# 1. The Debian base (bookworm's Python is 3.11, the version every pinned wheel is built for).
if [ "$rebuild_base" = 1 ] || ! podman image exists "$base_image"; then
  echo "build_map: making the Debian base from $mirror ..."
  rm -rf "$cache/rootfs"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
      bookworm "$cache/rootfs" "$mirror" > "$cache/debootstrap.log" 2>&1 \
    || { echo "build_map: debootstrap failed; see $cache/debootstrap.log" >&2; exit 1; }
  rm -rf "$cache/rootfs/var/cache/apt/archives/"*.deb "$cache/rootfs/var/lib/apt/lists/"* \
         "$cache/rootfs/usr/share/doc" "$cache/rootfs/usr/share/man"
  tar -C "$cache/rootfs" -c . | podman import --quiet - "$base_image" >/dev/null
  rm -rf "$cache/rootfs"
fi

# 2. The build context: the app's files (working tree), the torch wheel, the models folder.
context="$cache/context"
rm -rf "$context" && mkdir -p "$context/app" "$context/wheels" "$context/models"
tar -c --exclude=__pycache__ --exclude='*.pyc' \
    app.py app.yaml pyproject.toml requirements.txt requirements-cpu.txt README.md operators codegraph3d map \
  | tar -x -C "$context/app"
cp requirements.txt requirements-cpu.txt "$context/"
cp models/README.md "$context/models/README.md"
[ ! -f models/nyul_landmarks.json ] || cp models/nyul_landmarks.json "$context/models/"
if [ -n "$weights" ]; then
  cp -r "$weights" "$context/models/$(basename "$weights")"
fi
if [ "$variant" = cpu ]; then
  wheel=""
  for folder in ${PIP_FIND_LINKS:-} /opt/wheels "$cache/wheels"; do
    found=$(ls "$folder"/torch-2.13.0*cpu*-cp311-*.whl 2>/dev/null | head -n1 || true)
    [ -z "$found" ] || { wheel="$found"; break; }
  done
  if [ -z "$wheel" ]; then
    echo "build_map: downloading the CPU torch 2.13.0 wheel ..."
    mkdir -p "$cache/wheels"
    PIP_CERT="$ca_bundle" python3 -m pip download --quiet --no-deps --only-binary=:all: \
        --python-version 3.11 --platform manylinux_2_28_x86_64 \
        --index-url https://download.pytorch.org/whl/cpu -d "$cache/wheels" torch==2.13.0
    wheel=$(ls "$cache/wheels"/torch-2.13.0*.whl | head -n1)
  fi
  cp "$wheel" "$context/wheels/"
else
  touch "$context/wheels/.none"
fi

# 3. The image. chroot isolation: no nested user namespace or overlay mount is needed inside
#    this machine's sandbox. The CA bundle and the pip cache are mounted, never copied in.
mkdir -p "$cache/pip"
echo "build_map: building $tag ..."
podman build --isolation chroot --network host \
    --ulimit nofile=1024:1024 --ulimit nproc=4096:4096 \
    --volume "$ca_bundle:/run/build/ca.crt:ro" --volume "$cache/pip:/root/.cache/pip" \
    --build-arg BASE_IMAGE="$base_image" --build-arg TORCH_VARIANT="$variant" \
    --file map/Containerfile --tag "$tag" "$context"

elapsed=$(( $(date +%s) - started ))
size=$(podman image inspect --format '{{.Size}}' "$tag")
echo "build_map: built $tag in ${elapsed} s; image size $(( size / 1000000 )) MB"
if [ -n "$save" ]; then
  podman save --format oci-archive --output "$save" "$tag"
  echo "build_map: saved $tag to $save"
fi

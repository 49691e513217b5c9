#!/usr/bin/env bash
# Installs every Debian package prefixcap needs (idempotent; needs root or sudo on a fresh
# Debian 12), then configures and builds into build/ (or $PREFIXCAP_BUILD_DIR).
#
#   scripts/setup.sh              install + configure + build (Release) against Debian's LibTorch 1.13
#   scripts/setup.sh --no-build   install only
#   PREFIXCAP_TORCH=pypi scripts/setup.sh   the second configuration: LibTorch 2.15 (CUDA 13 build)
#                                 from the PyPI torch wheel, pinned, in .venv-torch/ (installed once,
#                                 then reused, with the benchmarks' anchors: transformers, Pillow,
#                                 librosa), built into
#                                 build-pypi/ (runs on CPUs without a GPU)
#   Torch_DIR=/opt/libtorch/share/cmake/Torch scripts/setup.sh   use another LibTorch (CUDA too)
#   PREFIXCAP_CMAKE_ARGS="-DPREFIXCAP_SANITIZE=ON" scripts/setup.sh   extra CMake options
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
torch_choice="${PREFIXCAP_TORCH:-debian}"
case "$torch_choice" in
  debian) build_dir="${PREFIXCAP_BUILD_DIR:-$root/build}" ;;
  pypi) build_dir="${PREFIXCAP_BUILD_DIR:-$root/build-pypi}" ;;
  *) echo "setup: PREFIXCAP_TORCH must be debian or pypi, not '$torch_choice'" >&2; exit 1 ;;
esac
torch_pin=2.15.0  # PREFIXCAP_TORCH=pypi: the torch wheel (LibTorch 2.15, CUDA 13.2 build)
do_build=1
[[ "${1:-}" == "--no-build" ]] && do_build=0

packages=(
  build-essential cmake pkg-config git
  libtorch-dev                    # LibTorch 1.13 (CPU); any newer one works via Torch_DIR
  libopenblas0-pthread            # fast BLAS behind LibTorch (Debian's default is the reference BLAS)
  libopenblas0-openmp             # the same BLAS on LibTorch's own OpenMP pool (selected below)
  nlohmann-json3-dev libpcre2-dev libcli11-dev
  libgtest-dev libgmock-dev
  libsndfile1-dev libsoxr-dev
  libavformat-dev libavcodec-dev libavutil-dev libswresample-dev libswscale-dev
  libavdevice-dev                 # caption --stream from capture devices (ALSA, PulseAudio)
  libcpp-httplib-dev              # caption-server (HTTP)
  libopencv-dev
  libspdlog-dev libfmt-dev
  clang libclang-rt-14-dev libomp-14-dev   # scripts/fuzz.sh: libFuzzer + sanitizers
  python3-matplotlib python3-pil  # scripts/plot_training; fuzz seeds (tests/fuzz/make_seeds.py)
  unzip                           # scripts/demo.sh: sound effects out of 0ad-data's zip
  openjdk-17-jre-headless         # METEOR 1.5 and the Stanford PTB tokenizer (official jars)
  curl p7zip-full ffmpeg yt-dlp   # scripts/get_dataset.sh (downloads, Clotho's 7z, AudioCaps clips)
  python3-venv                    # .venv-ref below
  python3-torch                   # .venv-ref: PyTorch 1.13 for transformers / sentence-transformers (FENSE goldens)
  libutf8proc-dev                 # Unicode for BERT's WordPiece tokenizer (FENSE)
  libgloo-dev                     # Gloo headers behind LibTorch's c10d ProcessGroupGloo (distributed training)
)

sudo_cmd=()
if [[ $(id -u) -ne 0 ]]; then sudo_cmd=(sudo); fi

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  if ((${#sudo_cmd[@]})) && ! command -v sudo >/dev/null; then
    echo "setup: run as root or install sudo" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  ${sudo_cmd[@]+"${sudo_cmd[@]}"} apt-get update -q || { echo "setup: apt-get update failed (no network?)" >&2; exit 1; }
  ${sudo_cmd[@]+"${sudo_cmd[@]}"} apt-get install -y -q --no-install-recommends "${missing[@]}"
else
  echo "setup: all Debian packages present"
fi

# LibTorch reaches BLAS through the libblas.so.3 alternative. The OpenMP build of OpenBLAS
# shares LibTorch's OpenMP threads; the pthreads build adds a second pool that fights it for the
# cores (docs/threads.md has the measurements). Select the OpenMP one unless told not to.
if [[ "${PREFIXCAP_KEEP_BLAS:-0}" != 1 ]]; then
  multiarch=$(gcc -print-multiarch 2>/dev/null || echo x86_64-linux-gnu)
  for lib in libblas.so.3 liblapack.so.3 libopenblas.so.0; do
    alt="$lib-$multiarch"
    target="/usr/lib/$multiarch/openblas-openmp/$lib"
    [[ -e "$target" ]] && update-alternatives --query "$alt" >/dev/null 2>&1 || continue
    current=$(update-alternatives --query "$alt" | awk '/^Value:/ {print $2}')
    if [[ "$current" != "$target" ]]; then
      echo "setup: selecting OpenMP OpenBLAS for $lib"
      ${sudo_cmd[@]+"${sudo_cmd[@]}"} update-alternatives --quiet --set "$alt" "$target"
    fi
  done
fi

# The reference environment of tests/test_reference.cpp and tests/test_fense.cpp, and the official
# jars for caption-eval: a virtual environment over Debian's python3 (--system-site-packages: its
# python3-torch 1.13, CPU) with, from PyPI, pinned: pycocoevalcap (meteor-1.5.jar with paraphrase
# data, stanford-corenlp-3.4.1.jar and its own Python wrappers around them), transformers
# (BertTokenizer, BertModel), sentence-transformers and aac-metrics (its fense/fer/sbert_sim/spider_fl
# functions; installed without its dependencies: CLAP and torchaudio are not needed for those).
# Test helpers only: prefixcap never runs Python.
ref_env="$root/.venv-ref"
reference_packages=(pycocoevalcap==1.2 transformers==4.46.3 sentence-transformers==3.3.1 Jinja2==3.1.4)
reference_nodeps=(aac-metrics==0.5.5)
ref_ok() {
  "$ref_env/bin/python" -c "import torch, pycocoevalcap.meteor.meteor, transformers, sentence_transformers, importlib.util as u; assert u.find_spec('aac_metrics')" >/dev/null 2>&1 || return 1
  # The list is read whole first: grep -q closing the pipe early would fail pip with SIGPIPE (pipefail).
  local frozen
  frozen=$("$ref_env/bin/pip" freeze 2>/dev/null) || return 1
  grep -qx "transformers==4.46.3" <<<"$frozen" && grep -qx "aac-metrics==0.5.5" <<<"$frozen"
}
if ! ref_ok; then
  echo "setup: installing ${reference_packages[*]} ${reference_nodeps[*]} into .venv-ref (PyPI, over Debian's python3-torch)"
  # An environment made by another Python (without Debian's torch) is replaced.
  if [[ -x "$ref_env/bin/python" ]] && ! "$ref_env/bin/python" -c "import torch" >/dev/null 2>&1; then rm -rf "$ref_env"; fi
  [[ -x "$ref_env/bin/pip" ]] || /usr/bin/python3 -m venv --system-site-packages "$ref_env" ||
    { echo "setup: python3 -m venv failed" >&2; exit 1; }
  if ! "$ref_env/bin/pip" install -q --disable-pip-version-check "${reference_packages[@]}" ||
     ! "$ref_env/bin/pip" install -q --disable-pip-version-check --no-deps "${reference_nodeps[@]}"; then
    echo "setup: could not install the reference packages from PyPI (no network?); tests/test_reference.cpp and tests/test_fense.cpp need them" >&2
    exit 1
  fi
  ref_ok || { echo "setup: .venv-ref is incomplete after installing (see the pip output above)" >&2; exit 1; }
fi
jar_dir=$("$ref_env/bin/python" -c "import os, pycocoevalcap.meteor.meteor as m; print(os.path.dirname(os.path.dirname(m.__file__)))")
echo "setup: official jars for caption-eval:"
echo "  export PREFIXCAP_METEOR_JAR=$jar_dir/meteor/meteor-1.5.jar PREFIXCAP_PTB_JAR=$jar_dir/tokenizer/stanford-corenlp-3.4.1.jar"

cmake_args=(-S "$root" -B "$build_dir" -DCMAKE_BUILD_TYPE=Release)
if [[ "$torch_choice" == pypi ]]; then
  # LibTorch 2.x from the PyPI wheel (its CMake config under torch/share/cmake); with its CUDA
  # libraries it is about 5 GB. nvcc (the CUDA toolkit) compiles prefixcap's own kernels.
  torch_env="$root/.venv-torch"
  if ! "$torch_env/bin/python" -W ignore -c "import torch; assert torch.__version__.split('+')[0] == '$torch_pin'" >/dev/null 2>&1; then
    echo "setup: installing torch==$torch_pin (PyPI) into .venv-torch"
    rm -rf "$torch_env"
    python3 -m venv "$torch_env" && "$torch_env/bin/pip" install -q --disable-pip-version-check "torch==$torch_pin" ||
      { echo "setup: could not install torch==$torch_pin from PyPI (no network?)" >&2; exit 1; }
  fi
  # The anchors of bench/ on this PyTorch 2.x: Hugging Face generate and CLIP (transformers),
  # ClipCap's image preprocessing (Pillow), PANNs' and Prefix-AAC's audio loading (librosa).
  if ! "$torch_env/bin/python" -W ignore -c "import transformers, numpy, PIL, librosa; assert transformers.__version__ == '4.46.3'; assert PIL.__version__ == '11.0.0'; assert librosa.__version__ == '0.11.0'" >/dev/null 2>&1; then
    echo "setup: installing transformers==4.46.3, pillow==11.0.0, librosa==0.11.0 and numpy (PyPI) into .venv-torch (the benchmarks' anchors)"
    "$torch_env/bin/pip" install -q --disable-pip-version-check "transformers==4.46.3" "pillow==11.0.0" "librosa==0.11.0" numpy ||
      { echo "setup: could not install transformers into .venv-torch (no network?)" >&2; exit 1; }
  fi
  torch_prefix=$("$torch_env/bin/python" -W ignore -c 'import torch; print(torch.utils.cmake_prefix_path)')
  cmake_args+=("-DCMAKE_PREFIX_PATH=$torch_prefix")
  if ! command -v nvcc >/dev/null && [[ -x /usr/local/cuda/bin/nvcc ]]; then
    cmake_args+=(-DCMAKE_CUDA_COMPILER=/usr/local/cuda/bin/nvcc)
  fi
fi

((do_build)) || exit 0

[[ -n "${Torch_DIR:-}" ]] && cmake_args+=("-DTorch_DIR=$Torch_DIR")
# shellcheck disable=SC2206
[[ -n "${PREFIXCAP_CMAKE_ARGS:-}" ]] && cmake_args+=(${PREFIXCAP_CMAKE_ARGS})
cmake "${cmake_args[@]}"
cmake --build "$build_dir" -j "$(nproc)"
echo "setup: built into $build_dir"

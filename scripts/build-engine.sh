#!/usr/bin/env bash
# Builds llama.cpp's llama-server once and prints the path of the archive that holds it.
#
# The source is the llama-cpp-python source distribution on PyPI (pinned version and sha256 below): it
# vendors the whole llama.cpp tree, tools/server included, and PyPI is the one source reachable here.
# The result (llama-server, the shared libraries it needs beside it, RUNPATH $ORIGIN, and BUILD-INFO)
# is one archive in a cache folder outside the clone, keyed by the sdist's sha256, the cmake flags and
# the archive layout, so every later call only finds it: the build itself runs once per machine.
#
#   scripts/build-engine.sh            build when missing, then print the archive path
#   scripts/build-engine.sh --key      print the cache key only (builds nothing)
#   scripts/build-engine.sh --vocab    print the path of models/ggml-vocab-llama-spm.gguf from the same
#                                      sdist (fetched when missing, builds nothing): the tokenizer of the
#                                      lab's tiny model (lab/model_mirror/make_gguf.py)
#
# Environment:
#   LLORCH_ENGINE_CACHE   cache folder (default ${XDG_CACHE_HOME:-$HOME/.cache}/llorch-kit/engine)
#   LLORCH_ENGINE_CUDA=1  build the CUDA backend as well (needs nvcc and CUDA's runtime libraries on the nodes;
#                         a separate cache key)
#   LLORCH_ENGINE_CUDA_ARCHS  CUDA architectures to compile for (CMAKE_CUDA_ARCHITECTURES, e.g. "90" for
#                         H100/H200 only, "80;86;89;90" for a mixed fleet); unset: llama.cpp's own default list,
#                         which covers more GPUs and compiles for much longer
#   LLORCH_ENGINE_SOURCE  an unpacked llama.cpp tree to build from instead of the pinned sdist, for a builder
#                         that cannot reach the package index; its contents are hashed into the cache key, so
#                         it never shares a key with the sdist build (the digest check is the caller's job)
#   LLORCH_ENGINE_JOBS    parallel compile jobs (default 2: the build machines are shared)
#   LLORCH_PIP            pip used to fetch the sdist (default the repo's .venv, then python3 -m pip)
set -euo pipefail

readonly SDIST_VERSION=0.3.36
readonly SDIST_SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
readonly SDIST_NAME=llama_cpp_python-${SDIST_VERSION}.tar.gz
# Bump when what goes into the archive changes, so an archive of the old layout is never reused.
readonly ARCHIVE_LAYOUT=1

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache_root=${LLORCH_ENGINE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/llorch-kit/engine}
jobs=${LLORCH_ENGINE_JOBS:-2}

# No network at build time: the web UI is neither downloaded (prebuilt from a Hugging Face bucket) nor
# built with npm. What a node must have stays at glibc and libstdc++: OpenSSL is off (the engine listens
# on plain HTTP behind the kit's own network rules) and so is OpenMP (ggml's own thread pool instead;
# a minimal Debian node has no libgomp1).
# shellcheck disable=SC2016 # $ORIGIN is for the dynamic loader, not the shell
cmake_flags=(
  -DCMAKE_BUILD_TYPE=Release
  -DBUILD_SHARED_LIBS=ON
  -DGGML_NATIVE=OFF
  -DLLAMA_CURL=OFF
  -DLLAMA_OPENSSL=OFF
  -DGGML_OPENMP=OFF
  -DLLAMA_BUILD_TESTS=OFF
  -DLLAMA_BUILD_EXAMPLES=OFF
  -DLLAMA_BUILD_SERVER=ON
  -DLLAMA_BUILD_UI=OFF
  -DLLAMA_USE_PREBUILT_UI=OFF
  -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON
  '-DCMAKE_INSTALL_RPATH=$ORIGIN'
)
flavor=cpu
if [[ ${LLORCH_ENGINE_CUDA:-0} == 1 ]]; then
  flavor=cuda
  cmake_flags+=(-DGGML_CUDA=ON)
  if [[ -n ${LLORCH_ENGINE_CUDA_ARCHS:-} ]]; then
    archs_shape='^[0-9a-z;-]{1,200}$'
    [[ $LLORCH_ENGINE_CUDA_ARCHS =~ $archs_shape ]] ||
      { echo "build-engine: LLORCH_ENGINE_CUDA_ARCHS must look like 90 or 80;86;90-real" >&2; exit 1; }
    cmake_flags+=("-DCMAKE_CUDA_ARCHITECTURES=$LLORCH_ENGINE_CUDA_ARCHS")
  fi
fi
source_override=${LLORCH_ENGINE_SOURCE:-}
if [[ -n $source_override ]]; then
  [[ -f $source_override/CMakeLists.txt && -d $source_override/tools/server ]] ||
    { echo "build-engine: LLORCH_ENGINE_SOURCE=$source_override is not a llama.cpp tree" >&2; exit 1; }
  # Contents, not the path: the same tree anywhere gives the same key.
  source_id=tree-$(tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$source_override" -cf - . |
    sha256sum | cut -c1-64)
else
  source_id=$SDIST_SHA256
fi

die() {
  echo "build-engine: $*" >&2
  exit 1
}

key_digest=$(printf '%s\n' "$source_id" "layout=$ARCHIVE_LAYOUT" "${cmake_flags[@]}" | sha256sum | cut -c1-16)
key=llama-server-${SDIST_VERSION}-${flavor}-${key_digest}
key_dir=$cache_root/$key
archive=$key_dir/llama-server.tar.gz

vocab_member=vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf
vocab=$cache_root/vocab-${SDIST_SHA256:0:16}/$(basename "$vocab_member")

# The sdist is kept beside the builds, and its digest is checked on every use, not only on download.
sdist=$cache_root/sdist/$SDIST_NAME
fetch_sdist() {
  if [[ -s $sdist ]] && echo "$SDIST_SHA256  $sdist" | sha256sum --check --status; then
    return
  fi
  local pip_cmd=(python3 -m pip) download_dir
  if [[ -n ${LLORCH_PIP:-} ]]; then
    pip_cmd=("$LLORCH_PIP")
  elif [[ -x $repo_root/.venv/bin/pip ]]; then
    pip_cmd=("$repo_root/.venv/bin/pip")
  fi
  download_dir=$(mktemp -d "$cache_root/download.XXXXXX")
  printf 'llama-cpp-python==%s --hash=sha256:%s\n' "$SDIST_VERSION" "$SDIST_SHA256" >"$download_dir/pin.txt"
  echo "build-engine: fetching $SDIST_NAME from the package index" >&2
  if ! "${pip_cmd[@]}" download -q --no-deps --no-binary :all: --require-hashes \
    -r "$download_dir/pin.txt" -d "$download_dir" >&2; then
    rm -rf "$download_dir"
    die "pip could not fetch llama-cpp-python==$SDIST_VERSION with sha256 $SDIST_SHA256"
  fi
  if ! echo "$SDIST_SHA256  $download_dir/$SDIST_NAME" | sha256sum --check --status; then
    rm -rf "$download_dir"
    die "$SDIST_NAME does not match the pinned sha256 $SDIST_SHA256"
  fi
  mkdir -p "$cache_root/sdist"
  mv "$download_dir/$SDIST_NAME" "$sdist"
  rm -rf "$download_dir"
}

case ${1:-} in
  --key)
    echo "$key"
    exit 0
    ;;
  --vocab)
    if [[ ! -s $vocab ]]; then
      mkdir -p "$cache_root"
      exec 9>"$cache_root/vocab.lock"
      flock 9
      if [[ ! -s $vocab ]]; then
        fetch_sdist
        mkdir -p "$(dirname "$vocab")"
        tar -xzOf "$sdist" "llama_cpp_python-$SDIST_VERSION/$vocab_member" >"$vocab.tmp"
        mv "$vocab.tmp" "$vocab"
      fi
    fi
    echo "$vocab"
    exit 0
    ;;
  '') ;;
  *) die "unknown argument: $1 (usage: build-engine.sh [--key | --vocab])" ;;
esac

# The fast path: one stat, no lock, nothing else started.
if [[ -s $archive ]]; then
  echo "$archive"
  exit 0
fi

# cmake's own CMAKE_GENERATOR variable picks the build tool (Ninja where make is absent); the output is the same.
build_tool="make"
[[ ${CMAKE_GENERATOR:-} != Ninja ]] || build_tool=ninja
for tool in cmake g++ "$build_tool" readelf strip sha256sum flock; do
  command -v "$tool" >/dev/null || die "$tool is missing; run scripts/system-deps.sh"
done
if [[ $flavor == cuda ]]; then
  command -v nvcc >/dev/null || die "LLORCH_ENGINE_CUDA=1 needs nvcc (a CUDA toolkit) on PATH"
fi

mkdir -p "$cache_root"
# One builder per key: a second caller waits here, then finds the archive the first one made.
exec 9>"$cache_root/$key.lock"
flock 9
if [[ -s $archive ]]; then
  echo "$archive"
  exit 0
fi
[[ -n $source_override ]] || fetch_sdist

work=$(mktemp -d "$cache_root/$key.work.XXXXXX")
trap 'rm -rf "$work"' EXIT
log=$cache_root/$key.build.log
echo "build-engine: building $key (nice -n 10, -j$jobs; minutes, once per machine; log: $log)" >&2
started=$(date +%s)

if [[ -n $source_override ]]; then
  source_dir=$source_override
else
  tar -xzf "$sdist" -C "$work" "llama_cpp_python-$SDIST_VERSION/vendor/llama.cpp"
  source_dir=$work/llama_cpp_python-$SDIST_VERSION/vendor/llama.cpp
fi
build_dir=$work/build
if ! {
  nice -n 10 cmake -S "$source_dir" -B "$build_dir" "${cmake_flags[@]}" &&
    nice -n 10 cmake --build "$build_dir" --target llama-server -j "$jobs"
} >"$log" 2>&1; then
  tail -n 20 "$log" >&2
  die "the build failed; the whole log is $log"
fi

# Ship the binary and exactly the shared libraries of the build tree it loads, found by walking the
# NEEDED entries; each under its soname as a plain file, so the archive holds no links.
bin_dir=$build_dir/bin
stage=$work/stage/llama-server
mkdir -p "$stage"
cp "$bin_dir/llama-server" "$stage/"
pending=("$stage/llama-server")
while ((${#pending[@]})); do
  elf=${pending[0]}
  pending=("${pending[@]:1}")
  while read -r soname; do
    if [[ -e $bin_dir/$soname && ! -e $stage/$soname ]]; then
      cp -L "$bin_dir/$soname" "$stage/$soname"
      pending+=("$stage/$soname")
    fi
  done < <(readelf -d "$elf" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p')
done
strip --strip-unneeded "$stage"/*
chmod 0755 "$stage"/*
# shellcheck disable=SC2016 # a literal $ORIGIN
readelf -d "$stage/llama-server" | grep -q 'R.*PATH.*\[\$ORIGIN\]' ||
  die "llama-server was linked without an \$ORIGIN runpath; its libraries would not be found beside it"
# A binary that cannot start here would not start on a node either: prove it before caching it.
version=$(env -i "$stage/llama-server" --version 2>&1 | grep -m1 '^version:' || true)
[[ -n $version ]] || die "the built llama-server does not start: $(env -i "$stage/llama-server" --version 2>&1 | tail -n 1)"

{
  if [[ -n $source_override ]]; then
    echo "source: a llama.cpp tree given by LLORCH_ENGINE_SOURCE (${source_id})"
  else
    echo "source: llama-cpp-python $SDIST_VERSION (sdist sha256 $SDIST_SHA256), vendor/llama.cpp"
  fi
  echo "llama.cpp $version"
  echo "key: $key"
  echo "flavor: $flavor"
  echo "cmake flags: ${cmake_flags[*]}"
} >"$stage/BUILD-INFO"

# Same tree, same bytes: sorted names, fixed times and owners, no gzip timestamp.
mkdir -p "$key_dir"
tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$work/stage" -cf - llama-server |
  gzip -n -6 >"$work/llama-server.tar.gz"
(cd "$work" && sha256sum llama-server.tar.gz) >"$key_dir/llama-server.tar.gz.sha256"
cp "$log" "$key_dir/build.log"
echo "$(($(date +%s) - started))" >"$key_dir/build-seconds"
mv "$work/llama-server.tar.gz" "$archive"
echo "build-engine: built $key in $(($(date +%s) - started)) s" >&2
echo "$archive"

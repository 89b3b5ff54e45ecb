#!/usr/bin/env bash
# Build ggml's quantizers as a shared library, from the llama.cpp that llama-cpp-python 0.3.36's
# sdist vendors: the C code llmfs's src/codec/ggml must match bit for bit.
#
#   scripts/build_libggml.sh DIR      # prints the library's path: DIR/build/bin/libggml-base.so
#   LLMFS_GGML_LIB=$(scripts/build_libggml.sh /tmp/ggml) cargo test --release --test ggml_quant
#
# Only the `ggml-base` target is built: it holds ggml.c (ggml_quantize_chunk) and ggml-quants.c
# (every quantize_row_*_ref), which is all the checks call; no llama, no CPU backend, no SIMD.
# ggml-base gets no -march flags even with GGML_NATIVE=ON (those go to ggml-cpu only), so on
# x86-64 its floating point is plain SSE2 without FMA: the arithmetic llmfs reproduces.
# Needs: python3 -m pip (the sdist comes from PyPI), cmake >= 3.14 (`pip install cmake` or
# apt's), a C/C++ compiler. About a minute on 2 cores.
set -euo pipefail
dir=${1:?usage: $0 DIR}
version=0.3.36
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
sdist=$dir/llama_cpp_python-$version.tar.gz
if [ ! -f "$sdist" ]; then
    python3 -m pip download -q --disable-pip-version-check --no-deps \
        --no-binary llama-cpp-python "llama-cpp-python==$version" -d "$dir" >&2
fi
src=$dir/llama_cpp_python-$version/vendor/llama.cpp
if [ ! -f "$src/CMakeLists.txt" ]; then
    tar -xzf "$sdist" -C "$dir" "llama_cpp_python-$version/vendor/llama.cpp"
fi
# Configured from llama.cpp's root as llama-cpp-python does (the vendored ggml/ alone lacks
# files its standalone CMakeLists wants); only the ggml-base target is compiled.
cmake -S "$src" -B "$dir/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
    -DGGML_NATIVE=OFF -DGGML_OPENMP=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF >"$dir/build.log" 2>&1 \
    && cmake --build "$dir/build" --target ggml-base -j "$(nproc)" >>"$dir/build.log" 2>&1 \
    || { tail -n 30 "$dir/build.log" >&2; exit 1; }
lib=$dir/build/bin/libggml-base.so
test -f "$lib"
echo "$lib"

// The Python module spu_kernels._C. Importing it loads the shared library, whose static
// initialisers register the torch ops (torch.ops.spu_kernels.*, see the *_linear.cpp files).
// The module itself only says how it was built, and exposes the host build of the Philox dropout
// mask so that tests on a machine without a GPU can check it against the Python spec.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <vector>

#include "philox.cuh"

// setup.py and the JIT loader (spu_kernels/_cuda_build.py) pass the build facts as bare tokens,
// e.g. -DSPU_CUDA_ARCHS_TOKEN=sm80_sm90+PTX, which survive any shell quoting; made strings here.
#define SPU_STR2(x) #x
#define SPU_STR(x) SPU_STR2(x)
#ifdef SPU_CUDA_ARCHS_TOKEN
#define SPU_CUDA_ARCHS SPU_STR(SPU_CUDA_ARCHS_TOKEN)
#else
#define SPU_CUDA_ARCHS "unknown"
#endif
#ifdef SPU_BUILD_INFO_TOKEN
#define SPU_BUILD_INFO SPU_STR(SPU_BUILD_INFO_TOKEN)
#else
#define SPU_BUILD_INFO "unknown"
#endif

namespace {

std::vector<uint32_t> philox_first_word(uint64_t seed, const std::vector<uint64_t>& counters) {
  std::vector<uint32_t> out;
  out.reserve(counters.size());
  for (uint64_t c : counters) out.push_back(spu::philox4x32_10_first(seed, c));
  return out;
}

// The keep mask of a (rows, cols) input, row-major, from the kernels' own code (host build):
// per element (dropout_keep, the strided paths) or four columns per Philox call (dropout_keep4,
// the vectorised paths).
std::vector<uint8_t> dropout_keep_mask(uint64_t seed, uint64_t rows, uint64_t cols, uint32_t threshold, bool grouped) {
  std::vector<uint8_t> out;
  out.reserve(rows * cols);
  for (uint64_t t = 0; t < rows; ++t) {
    uint32_t bits = 0;
    for (uint64_t c = 0; c < cols; ++c) {
      if (!grouped) {
        out.push_back(spu::dropout_keep(seed, t, c, cols, threshold) ? 1 : 0);
        continue;
      }
      if (c % 4 == 0) bits = spu::dropout_keep4(seed, t, c / 4, cols, threshold);
      out.push_back((bits >> (c % 4)) & 1u);
    }
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "spu_kernels CUDA C++ backend: torch.ops.spu_kernels.* (registered on import) and build facts";
  m.def("philox_first_word", &philox_first_word, pybind11::arg("seed"), pybind11::arg("counters"),
        "Host build of the kernels' Philox4x32-10 first output word for each 64-bit counter");
  m.def("dropout_keep_mask", &dropout_keep_mask, pybind11::arg("seed"), pybind11::arg("rows"), pybind11::arg("cols"),
        pybind11::arg("threshold"), pybind11::arg("grouped") = true,
        "Host build of the kernels' dropout keep mask, row-major (rows * cols bytes); grouped: four columns "
        "per Philox call, as the vectorised kernel paths, else one call per element");
  m.attr("cuda_archs") = std::string(SPU_CUDA_ARCHS);
  m.attr("build_info") = std::string(SPU_BUILD_INFO);
}

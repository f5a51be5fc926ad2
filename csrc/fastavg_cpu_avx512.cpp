// The CPU kernels for AVX-512 (F, BW, VL; chosen at run time by fastavg_cpu.cpp); empty off x86-64.
#include "fastavg_cpu.h"

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma")
namespace fastavg {
namespace cpu_avx512 {
#include "fastavg_cpu_kernel.inc"
}  // namespace cpu_avx512
}  // namespace fastavg
#pragma GCC pop_options
#endif

// AVX-512 (F, BW, VL, DQ) build of the CPU row kernels; see cpu_kernels_avx2.cpp for how the target is chosen.
#include "grpo_kernels.h"
#if defined(GRPO_HAVE_AVX512)
#pragma GCC push_options
#pragma GCC diagnostic ignored "-Wpsabi"
#pragma GCC target("avx,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt,avx512f,avx512bw,avx512vl,avx512dq")
// GCC's target pragma does not define the ISA macros that ATen's and SLEEF's headers test: define them here,
// as -m flags on the command line would.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#ifndef __BMI__
#define __BMI__ 1
#endif
#ifndef __BMI2__
#define __BMI2__ 1
#endif
#ifndef __LZCNT__
#define __LZCNT__ 1
#endif
#ifndef __POPCNT__
#define __POPCNT__ 1
#endif
#ifndef __AVX512F__
#define __AVX512F__ 1
#endif
#ifndef __AVX512BW__
#define __AVX512BW__ 1
#endif
#ifndef __AVX512VL__
#define __AVX512VL__ 1
#endif
#ifndef __AVX512DQ__
#define __AVX512DQ__ 1
#endif
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "cpu_kernels_impl.h"

namespace grpo {
const CpuKernelTable& cpu_kernels_AVX512() { return AVX512::make_table("AVX512"); }
}  // namespace grpo
#pragma GCC pop_options
#endif

// AVX2+FMA build of the CPU row kernels. The target is switched for this translation unit only (GCC pragma),
// so the build host's CPU is never probed; cpu_ops.cpp calls these kernels only when the running CPU supports
// AVX2, FMA, F16C and BMI2 (__builtin_cpu_supports at run time), capped by ATEN_CPU_CAPABILITY when it is set.
#include "grpo_kernels.h"
#if defined(GRPO_HAVE_AVX2)
#pragma GCC push_options
#pragma GCC diagnostic ignored "-Wpsabi"
#pragma GCC target("avx,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
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
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "cpu_kernels_impl.h"

namespace grpo {
const CpuKernelTable& cpu_kernels_AVX2() { return AVX2::make_table("AVX2"); }
}  // namespace grpo
#pragma GCC pop_options
#endif

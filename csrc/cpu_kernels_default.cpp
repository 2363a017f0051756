// Portable build of the CPU row kernels (no ISA-specific code; the compiler may still auto-vectorize).
#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT
#include "cpu_kernels_impl.h"

namespace grpo {
const CpuKernelTable& cpu_kernels_DEFAULT() { return DEFAULT::make_table("DEFAULT"); }
}  // namespace grpo

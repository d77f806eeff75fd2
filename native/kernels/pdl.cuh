// Programmatic dependent launch (Hopper and later; no-ops before sm_90), shared by the kernel files.
//
// A kernel launched with programmatic stream serialization (the engine's GEMV kernels, cuda_llama.cpp
// launchGemv) may start while the kernel ahead of it in the stream still runs, once every CTA of that one has
// called letDependentsLaunch() or exited. It must call waitForInputs() before it reads anything the earlier
// kernel writes, or writes anything: that wait returns when the earlier grid has completed and its memory is
// visible. For a kernel launched normally, waitForInputs() returns at once and letDependentsLaunch() does nothing.
#pragma once

namespace tandem_pdl {

__device__ __forceinline__ void waitForInputs() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Lets the next kernel (if launched programmatically) start its CTAs now: they can stream their weights while
// this one finishes. Safe anywhere in a kernel: it changes when the next one starts, not what it sees.
__device__ __forceinline__ void letDependentsLaunch() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

}  // namespace tandem_pdl

// timeGemm: the GEMM ceiling of bench:engine, measured through the same dlopened cuBLAS the GPU engine uses.
#pragma once

#include <napi.h>

namespace tandem::engine {

// timeGemm(device: CudaDevice, { m, n, k, iterations, warmup, cublas: string[] }) -> Promise<number[]>
// Times `iterations` bf16 GEMMs y[m, n] = x[m, k] . w[n, k]^T (bf16 output, fp32 accumulation, the layout of
// the engine's linear layers) on the device's thread and stream, each between two CUDA events, after `warmup`
// untimed ones. Inputs are pseudo-random in [-1, 1) (all-zero operands draw less power and clock higher).
// The buffers are allocated for the call and freed before it settles.
Napi::Value TimeGemm(const Napi::CallbackInfo& info);

}  // namespace tandem::engine

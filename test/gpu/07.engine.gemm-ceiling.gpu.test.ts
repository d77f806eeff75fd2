import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BadArgumentError, CudaDevice, DisposedError } from '../../lib/index.js';
import { native } from '../../lib/errors.js';
import { loadBinding } from '../../lib/native/binding.js';
import { libraryCandidates } from '../../lib/native/libraries.js';
import { gpuGate } from '../helpers/gpu.js';

// timeGemm (native/src/engine/gemm_bench.cpp): the GEMM ceiling bench:engine measures through the engine's cuBLAS.
const gate = await gpuGate(1);
const { binding } = loadBinding();

describe('timeGemm arguments', () => {
  it('anything but a CudaDevice is a TypeError, on any machine', () => {
    expect(() => binding.timeGemm({} as never, { m: 8, n: 8, k: 8, iterations: 1 })).toThrow(
      'timeGemm expects a CudaDevice as its first argument',
    );
  });
});

describe.skipIf(!gate.run)('GEMM ceiling (timeGemm)', () => {
  let device: CudaDevice;
  beforeAll(async () => {
    device = await CudaDevice.open(0);
  });
  afterAll(async () => {
    await device?.dispose();
  });

  it('times each of the GEMMs asked for, frees its buffers, and works again on odd shapes', async () => {
    const before = (await device.memoryInfo()).freeBytes;
    const cublas = libraryCandidates().cublas;
    const ms = await native(() =>
      binding.timeGemm(device.raw, { m: 512, n: 1024, k: 256, iterations: 4, warmup: 2, cublas }),
    );
    expect(ms).toHaveLength(4);
    for (const t of ms) expect(Number.isFinite(t) && t > 0, String(t)).toBe(true);
    // The largest shape bench:engine times (8192 tokens through an 8B model's fused gate/up), and an odd one.
    for (const [m, n, k] of [
      [8192, 28672, 4096],
      [3000, 14336 * 2, 4096],
      [7, 13, 5],
    ] as const) {
      const times = await native(() => binding.timeGemm(device.raw, { m, n, k, iterations: 2, cublas }));
      expect(times).toHaveLength(2);
      for (const t of times) expect(t).toBeGreaterThan(0);
    }
    // 64 MiB of slack: the driver's own bookkeeping moves a little; 3 x 8192 x 28672 bf16 buffers would be 1 GiB.
    expect((await device.memoryInfo()).freeBytes).toBeGreaterThan(before - 64 * 2 ** 20);
  });

  it('refuses a bad shape with BadArgumentError, and a disposed device with DisposedError', async () => {
    await expect(
      native(() => binding.timeGemm(device.raw, { m: 0, n: 8, k: 8, iterations: 1 })),
    ).rejects.toBeInstanceOf(BadArgumentError);
    await expect(
      native(() => binding.timeGemm(device.raw, { m: 8, n: 8, k: 8, iterations: 0 })),
    ).rejects.toBeInstanceOf(BadArgumentError);
    const other = await CudaDevice.open(0);
    await other.dispose();
    await expect(native(() => binding.timeGemm(other.raw, { m: 8, n: 8, k: 8, iterations: 1 }))).rejects.toBeInstanceOf(
      DisposedError,
    );
    // The device that was refused still works.
    const ms = await native(() => binding.timeGemm(device.raw, { m: 64, n: 64, k: 64, iterations: 1 }));
    expect(ms).toHaveLength(1);
  });
});

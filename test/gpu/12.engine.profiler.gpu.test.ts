import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CudaDevice, DisposedError } from '../../lib/index.js';
import { native } from '../../lib/errors.js';
import { loadBinding } from '../../lib/native/binding.js';
import { gpuGate } from '../helpers/gpu.js';

// cudaProfiler (native/src/addon.cpp): the cuProfilerStart / cuProfilerStop range that bench:engine --profile-case
// opens around one forward for ncu --profile-from-start off (scripts/profile-engine.sh). Without a profiler attached
// both calls do nothing and resolve.
const gate = await gpuGate(1);
const { binding } = loadBinding();

describe('cudaProfiler arguments', () => {
  it('anything but a CudaDevice is a TypeError, on any machine', () => {
    expect(() => binding.cudaProfiler({} as never, 'start')).toThrow(
      'cudaProfiler expects a CudaDevice as its first argument',
    );
  });
});

describe.skipIf(!gate.run)('cudaProfiler on a GPU', () => {
  let device: CudaDevice;
  beforeAll(async () => {
    device = await CudaDevice.open(0);
  });
  afterAll(async () => {
    await device?.dispose();
  });

  it('starts and stops the range around work on the device, twice, with no profiler attached', async () => {
    for (let i = 0; i < 2; i++) {
      await native(() => binding.cudaProfiler(device.raw, 'start'));
      const buffer = await device.alloc(1 << 20);
      await buffer.fill(7);
      await native(() => binding.cudaProfiler(device.raw, 'stop'));
      await buffer.dispose();
    }
  });

  it('refuses a bad action with TypeError and a disposed device with DisposedError', async () => {
    expect(() => binding.cudaProfiler(device.raw, 'pause' as never)).toThrow(
      "cudaProfiler expects 'start' or 'stop' as its second argument",
    );
    const other = await CudaDevice.open(0);
    await other.dispose();
    await expect(native(() => binding.cudaProfiler(other.raw, 'start'))).rejects.toBeInstanceOf(DisposedError);
    // The device that was refused still works.
    await native(() => binding.cudaProfiler(device.raw, 'stop'));
  });
});

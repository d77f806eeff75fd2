import { beforeAll, afterAll, describe, expect, it } from 'vitest';
import { BadArgumentError, CudaDevice, DisposedError, OutOfBoundsError, type Capabilities } from '../../lib/index.js';
import { gpuGate } from '../helpers/gpu.js';

// GPU smoke test: allocate, copy host -> device -> host, run kernels from the fatbin, check results.
// Skipped with the reason printed where no GPU is present; a failure under `npm run test:gpu`.
const gate = await gpuGate(1);

describe.skipIf(!gate.run)('GPU smoke test', () => {
  let caps: Capabilities;
  let device: CudaDevice;

  beforeAll(async () => {
    caps = gate.caps;
    device = await CudaDevice.open(0);
  });
  afterAll(async () => {
    await device?.dispose();
  });

  it('capabilities list the devices and the fatbin loads on device 0', () => {
    expect(caps.cuda.available).toBe(true);
    expect(caps.cuda.devices.length).toBeGreaterThan(0);
    for (const d of caps.cuda.devices) {
      expect(d.uuid).toMatch(/^GPU-[0-9a-f]{8}-/);
      expect(d.pciBusId).toMatch(/^[0-9a-f]{4,8}:[0-9a-f]{2}:[0-9a-f]{2}\.\d$/);
      expect(d.memoryBytes).toBeGreaterThan(1e9);
    }
    expect(caps.kernels.loaded, caps.kernels.reason).toBe(true);
    expect(device.name).toBe(caps.cuda.devices[0]!.name);
  });

  it('copies 64 MiB host -> device -> host intact', async () => {
    const bytes = 64 << 20;
    const buffer = await device.alloc(bytes);
    const source = new Uint8Array(bytes);
    for (let i = 0; i < bytes; i++) source[i] = (i * 131 + 7) & 0xff;
    await buffer.copyFromHost(source);
    const back = new Uint8Array(bytes);
    await buffer.copyToHost(back);
    expect(Buffer.compare(Buffer.from(back.buffer), Buffer.from(source.buffer))).toBe(0);
    // Partial copies at an offset land where asked.
    const patch = new Uint8Array(4096).fill(0xab);
    await buffer.copyFromHost(patch, 1 << 20);
    const window = new Uint8Array(8192);
    await buffer.copyToHost(window, (1 << 20) - 4096);
    expect(window.subarray(0, 4096)).toEqual(source.subarray((1 << 20) - 4096, 1 << 20));
    expect(window.subarray(4096).every((b) => b === 0xab)).toBe(true);
    await buffer.dispose();
  });

  it('runs tandem_pattern_u32 and tandem_axpy_f32 from the fatbin', async () => {
    const n = 1 << 20;
    const words = await device.alloc(n * 4);
    await device.launch('tandem_pattern_u32', { grid: 264, block: 256 }, [words, { u32: 12345 }, { u32: n }]);
    const got = new Uint32Array(n);
    await words.copyToHost(got);
    for (const i of [0, 1, 255, 4096, n - 1]) expect(got[i]).toBe((Math.imul(12345, 2654435761) + i) >>> 0);

    const x = await device.alloc(n * 4);
    const y = await device.alloc(n * 4);
    const hx = Float32Array.from({ length: n }, (_, i) => i % 1000);
    const hy = Float32Array.from({ length: n }, (_, i) => 1 + (i % 7));
    await x.copyFromHost(hx);
    await y.copyFromHost(hy);
    await device.launch('tandem_axpy_f32', { grid: 264, block: 256 }, [y, x, { f32: 0.5 }, { u32: n }]);
    const out = new Float32Array(n);
    await y.copyToHost(out);
    let mismatches = 0;
    for (let i = 0; i < n; i++) if (out[i] !== Math.fround(0.5 * hx[i]! + hy[i]!)) mismatches++;
    expect(mismatches).toBe(0);
    await Promise.all([words.dispose(), x.dispose(), y.dispose()]);
  });

  it('rejects bad input with typed errors and stays usable', async () => {
    const buffer = await device.alloc(1024);
    await expect(buffer.copyFromHost(new Uint8Array(2048))).rejects.toBeInstanceOf(OutOfBoundsError);
    await expect(buffer.copyToHost(new Uint8Array(16), 1020)).rejects.toBeInstanceOf(OutOfBoundsError);
    await expect(device.launch('no_such_kernel', { grid: 1, block: 1 }, [])).rejects.toBeInstanceOf(BadArgumentError);
    await expect(device.alloc(-5)).rejects.toBeInstanceOf(BadArgumentError);
    await buffer.dispose();
    await expect(buffer.copyToHost(new Uint8Array(16))).rejects.toBeInstanceOf(DisposedError);
    await buffer.dispose(); // twice is harmless
    const ok = await device.alloc(16);
    await ok.fill(7);
    const back = new Uint8Array(16);
    await ok.copyToHost(back);
    expect([...back]).toEqual(new Array(16).fill(7));
    await ok.dispose();
  });

  it('opens every visible device, and dispose frees what was left allocated', async () => {
    for (const info of caps.cuda.devices) {
      const d = info.ordinal === 0 ? device : await CudaDevice.open(info.ordinal);
      const before = await d.memoryInfo();
      const leftover = await d.alloc(256 << 20);
      const during = await d.memoryInfo();
      expect(before.freeBytes - during.freeBytes).toBeGreaterThanOrEqual(256 << 20);
      await d.launch('tandem_pattern_u32', { grid: 1, block: 32 }, [leftover, { u32: 1 }, { u32: 32 }]);
      if (d !== device) {
        await d.dispose();
        await expect(leftover.copyToHost(new Uint8Array(4))).rejects.toBeInstanceOf(DisposedError);
      } else {
        await leftover.dispose();
      }
    }
  });
});

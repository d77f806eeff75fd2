import type { CudaDevice, DeviceBuffer } from '../../lib/index.js';

/** Fills bytes [offset, offset+length) of `buffer` on the GPU with the test pattern (see pattern.cu). */
export async function fillPatternOnGpu(
  device: CudaDevice,
  buffer: DeviceBuffer,
  seed: number,
  offset = 0,
  length = buffer.size,
  base = offset,
) {
  await device.launch('tandem_fill_pattern_u8', { grid: 528, block: 256 }, [
    { ptr: buffer.address + BigInt(offset) },
    { u64: BigInt(length) },
    { u32: seed },
    { u64: BigInt(base) },
  ]);
}

/** Counts, on the GPU, bytes of [offset, offset+length) that differ from the pattern starting at `base`. */
export async function mismatchesOnGpu(
  device: CudaDevice,
  buffer: DeviceBuffer,
  seed: number,
  offset: number,
  length: number,
  base: number,
) {
  const counter = await device.alloc(8);
  try {
    await counter.fill(0);
    await device.launch('tandem_check_pattern_u8', { grid: 528, block: 256 }, [
      { ptr: buffer.address + BigInt(offset) },
      { u64: BigInt(length) },
      { u32: seed },
      { u64: BigInt(base) },
      counter,
    ]);
    const out = new BigUint64Array(1);
    await counter.copyToHost(out);
    return Number(out[0]);
  } finally {
    await counter.dispose();
  }
}

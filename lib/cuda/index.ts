/**
 * GPUs from TypeScript: open a device, allocate memory, copy, run a kernel from Tandem's fatbin.
 * Each CudaDevice owns a native thread on which its context is current; every call returns a Promise
 * that settles when the work has completed on the GPU.
 */
import { BadArgumentError, CudaUnavailableError, KernelsUnavailableError, native, nativeSync } from '../errors.js';
import { loadBinding, type RawCudaDevice, type RawDeviceBuffer } from '../native/binding.js';
import { kernelImage, readKernelImage } from '../native/kernels.js';
import { libraryCandidates } from '../native/libraries.js';

let driverProbe: Promise<{ available: boolean; reason?: string; deviceCount: number }> | undefined;

/** Loads the CUDA driver (once per process) and says whether it is usable. */
export function probeCuda(): Promise<{ available: boolean; reason?: string; deviceCount: number }> {
  driverProbe ??= loadBinding()
    .binding.probe({ libraries: libraryCandidates() })
    .then((raw) => ({
      available: raw.cuda.available,
      ...(raw.cuda.reason ? { reason: raw.cuda.reason } : {}),
      deviceCount: raw.cuda.devices.length,
    }));
  return driverProbe;
}

/** A launch argument: a device buffer (or raw address), or a scalar tagged with its C type. */
export type KernelArg =
  | DeviceBuffer
  | { ptr: bigint }
  | { i32: number }
  | { u32: number }
  | { i64: bigint }
  | { u64: bigint }
  | { f32: number }
  | { f64: number };

export interface LaunchConfig {
  grid: number | [number, number, number];
  block: number | [number, number, number];
  sharedBytes?: number;
}

const dim3 = (d: number | [number, number, number]): [number, number, number] =>
  typeof d === 'number' ? [d, 1, 1] : d;

export class DeviceBuffer {
  /** @internal */
  constructor(
    /** @internal */ readonly raw: RawDeviceBuffer,
    readonly device: CudaDevice,
  ) {}

  get size(): number {
    return this.raw.size;
  }
  /** The device address, for registration with the transfer runtime. Never dereference it in JS. */
  get address(): bigint {
    return this.raw.address;
  }
  get disposed(): boolean {
    return this.raw.disposed;
  }

  /** Copies `source` into this buffer at byte `offset`. */
  copyFromHost(source: ArrayBufferView, offset = 0): Promise<void> {
    return native(() => this.raw.copyFromHost(source, offset));
  }
  /** Copies `target.byteLength` bytes from byte `offset` of this buffer into `target`. */
  copyToHost(target: ArrayBufferView, offset = 0): Promise<void> {
    return native(() => this.raw.copyToHost(target, offset));
  }
  /** Sets every byte to `byte`. */
  fill(byte: number): Promise<void> {
    return native(() => this.raw.fill(byte));
  }
  dispose(): Promise<void> {
    return native(() => this.raw.dispose());
  }
  [Symbol.asyncDispose](): Promise<void> {
    return this.dispose();
  }
}

export class CudaDevice {
  private kernelsLoaded = false;

  private constructor(
    /** @internal */ readonly raw: RawCudaDevice,
    readonly ordinal: number,
    readonly name: string,
  ) {}

  /** Opens device `ordinal` (retains its primary context on the device's own thread). */
  static async open(ordinal = 0): Promise<CudaDevice> {
    if (!Number.isInteger(ordinal) || ordinal < 0)
      throw new BadArgumentError(`device ordinal must be a non-negative integer, got ${ordinal}`);
    const cuda = await probeCuda();
    if (!cuda.available) throw new CudaUnavailableError(cuda.reason ?? 'unknown reason');
    const { binding } = loadBinding();
    const raw = nativeSync(() => new binding.CudaDevice(ordinal));
    try {
      const { name } = await native(() => raw.ready());
      return new CudaDevice(raw, ordinal, name);
    } catch (error) {
      await raw.dispose();
      throw error;
    }
  }

  get disposed(): boolean {
    return this.raw.disposed;
  }

  async alloc(bytes: number): Promise<DeviceBuffer> {
    const raw = await native(() => this.raw.alloc(bytes));
    return new DeviceBuffer(raw, this);
  }

  memoryInfo(): Promise<{ freeBytes: number; totalBytes: number }> {
    return native(() => this.raw.memoryInfo());
  }

  /** Loads Tandem's kernel fatbin on this device (done automatically by the first launch). */
  async loadKernels(): Promise<void> {
    const image = kernelImage();
    const bytes = readKernelImage(image);
    if (!bytes) throw new KernelsUnavailableError(image.manifest.reason ?? `${image.path} is missing`);
    await native(() => this.raw.loadKernels(bytes));
    this.kernelsLoaded = true;
  }

  /** Runs kernel `name` from the fatbin and resolves when it has finished. */
  async launch(name: string, config: LaunchConfig, args: KernelArg[]): Promise<void> {
    if (!this.kernelsLoaded) await this.loadKernels();
    let signature = '';
    const values: unknown[] = [];
    for (const arg of args) {
      if (arg instanceof DeviceBuffer) {
        if (arg.device !== this)
          throw new BadArgumentError(
            `kernel ${name}: a buffer of device ${arg.device.ordinal} was passed to device ${this.ordinal}`,
          );
        signature += 'p';
        values.push(arg.raw);
      } else if ('ptr' in arg) {
        signature += 'p';
        values.push(arg.ptr);
      } else if ('i32' in arg) {
        signature += 'i';
        values.push(arg.i32);
      } else if ('u32' in arg) {
        signature += 'u';
        values.push(arg.u32);
      } else if ('i64' in arg) {
        signature += 'q';
        values.push(arg.i64);
      } else if ('u64' in arg) {
        signature += 'Q';
        values.push(arg.u64);
      } else if ('f32' in arg) {
        signature += 'f';
        values.push(arg.f32);
      } else {
        signature += 'd';
        values.push(arg.f64);
      }
    }
    await native(() =>
      this.raw.launch(name, dim3(config.grid), dim3(config.block), config.sharedBytes ?? 0, signature, values),
    );
  }

  /**
   * Times `iterations` contiguous copies of `bytes` on this device's stream with CUDA events (ms each):
   * cuMemcpyPeerAsync between two devices, cuMemcpyAsync otherwise (device or pinned host memory;
   * pass device -1 for host). The baselines of bench:transfer.
   */
  timeCopy(
    dst: { address: bigint; device: number },
    src: { address: bigint; device: number },
    bytes: number,
    iterations: number,
  ): Promise<number[]> {
    return native(() => this.raw.timeCopy(dst.address, dst.device, src.address, src.device, bytes, iterations));
  }

  synchronize(): Promise<void> {
    return native(() => this.raw.synchronize());
  }

  /** Frees every buffer still allocated on this device, releases its context and joins its thread. */
  dispose(): Promise<void> {
    return native(() => this.raw.dispose());
  }
  [Symbol.asyncDispose](): Promise<void> {
    return this.dispose();
  }
}

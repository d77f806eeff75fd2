/**
 * The reference engine's GPU model runner: the same Llama-family model as CpuModelRunner, in bf16 with fp32
 * accumulation (native/src/engine/cuda_llama.cpp). GEMMs go through cuBLAS, loaded at run time; embedding,
 * fused residual + RMSNorm, RoPE with the KV write, paged attention and SwiGLU are Tandem's kernels
 * (native/kernels/llama.cu). The KV pool is a DeviceBuffer in lib/kv's layout (bf16, NHD), so a worker can
 * register it with the transfer agent (`agent.registerDevice(runner.kvDeviceBuffer)`) and move blocks.
 *
 *   const runner = await CudaModelRunner.create({ config, device: 0, weights: 'dummy:tiny' });
 *   const logits = await runner.forward(batch);   // nseq x vocabSize, fp32
 *   await runner.dispose();
 */
import { BadArgumentError, native, nativeSync, OutOfMemoryError } from '../errors.js';
import { CudaDevice, type DeviceBuffer } from '../cuda/index.js';
import { checkInteger, kvPool, type KvLayout, type KvPool, type KvPoolSpec } from '../kv/pool.js';
import { loadBinding, type RawCudaLlama } from '../native/binding.js';
import { libraryCandidates } from '../native/libraries.js';
import {
  DEFAULT_DUMMY_SEED,
  loadWeights,
  nativeModelFields,
  runnerConfigAndLayout,
  runnerPoolSpec,
  type NamedTensor,
  type WeightSource,
} from './cpu.js';
import { expectedTensors, type ModelConfig } from './model/config.js';
import { forwardArgs, type ForwardBatch, type ModelRunner, type SampledLogits, type SamplePlan } from './runner.js';

/** Share of the GPU's free memory (after the weights) the KV pool takes when numBlocks is not given. */
export const DEFAULT_GPU_KV_FRACTION = 0.8;
/** Kept free for activations, cuBLAS and the CUDA context when the pool is sized from free memory. */
export const GPU_ACTIVATION_RESERVE_BYTES = 2 * 2 ** 30;

export interface CudaModelRunnerOptions {
  config: ModelConfig;
  /** A device ordinal (opened and owned by the runner) or an open CudaDevice (the caller's). Default 0. */
  device?: number | CudaDevice;
  /** Blocks in the KV pool. Default: from kvCacheBytes, else DEFAULT_GPU_KV_FRACTION of free memory. */
  numBlocks?: number;
  /** Bytes of KV pool when numBlocks is absent. */
  kvCacheBytes?: number;
  /** Share of free memory after the weights the default pool takes. Default DEFAULT_GPU_KV_FRACTION. */
  kvCacheFraction?: number;
  /** Upper bound of the default pool, in blocks. */
  maxDefaultBlocks?: number;
  /** Tokens per block. Default 16. */
  blockSize?: number;
  /** KV pool layout (lib/kv). Default 'block-major'. */
  layout?: KvLayout;
  /** The weights, or a checkpoint directory / `dummy:<preset>` name for `loadWeights`. */
  weights: WeightSource | string;
  /** Seed of `dummy:` weights when `weights` is a name. */
  seed?: number;
  /**
   * Decode steps (one token per sequence) replay a CUDA graph captured once per batch shape instead of issuing
   * each kernel and GEMM from the host. Default true; `cudaGraphs` says whether they are in use.
   */
  cudaGraphs?: boolean;
  /** Called after each tensor is on the GPU: tensors done, tensors in all, its name. */
  onProgress?: (loaded: number, total: number, name: string) => void;
}

/** bf16 bytes of a config's weights (what the GPU runner allocates, give or take alignment). */
export function gpuWeightBytes(config: ModelConfig): number {
  let elements = 0;
  for (const t of expectedTensors(config)) elements += t.shape.reduce((a, b) => a * b, 1);
  return elements * 2;
}

export class CudaModelRunner implements ModelRunner {
  readonly vocabSize: number;
  readonly blockSize: number;
  readonly numBlocks: number;
  readonly maxPositions: number;
  /** The KV pool as lib/kv describes it (bf16, NHD). */
  readonly kvPoolSpec: KvPoolSpec;
  readonly kvPool: KvPool;

  private constructor(
    private readonly raw: RawCudaLlama,
    readonly config: ModelConfig,
    pool: KvPool,
    /** The GPU the model runs on. */
    readonly device: CudaDevice,
    /** The KV pool's memory, for `agent.registerDevice()`. */
    readonly kvDeviceBuffer: DeviceBuffer,
    private readonly ownsDevice: boolean,
  ) {
    this.vocabSize = config.vocabSize;
    this.blockSize = pool.blockSize;
    this.numBlocks = pool.numBlocks;
    this.maxPositions = config.maxPositionEmbeddings;
    this.kvPool = pool;
    this.kvPoolSpec = runnerPoolSpec(pool, 'bf16');
  }

  /**
   * Opens the device (when given an ordinal), loads the kernels, sizes and allocates the KV pool, copies every
   * weight in as bf16 and checks that none is missing. Throws CudaUnavailableError, KernelsUnavailableError,
   * BackendUnavailableError (cuBLAS) or OutOfMemoryError with the reason; nothing stays allocated then.
   */
  static async create(options: CudaModelRunnerOptions): Promise<CudaModelRunner> {
    const where = 'CudaModelRunner.create';
    const { config, layout } = runnerConfigAndLayout(where, options);
    if (config.headDim > 256)
      throw new BadArgumentError(`${where}: the GPU engine supports headDim up to 256 (got ${config.headDim})`);
    const blockSize = options.blockSize ?? 16;
    checkInteger(where, 'blockSize', blockSize, 1);
    const given = options.device ?? 0;
    const ownsDevice = typeof given === 'number';
    const device = typeof given === 'number' ? await CudaDevice.open(given) : given;
    let kvBuffer: DeviceBuffer | undefined;
    let raw: RawCudaLlama | undefined;
    try {
      await device.loadKernels();
      const one = kvPool({
        layers: config.numLayers,
        kvHeads: config.numKvHeads,
        headDim: config.headDim,
        blockSize,
        numBlocks: 1,
        dtype: 'bf16',
        layout,
      });
      let numBlocks = options.numBlocks;
      if (numBlocks === undefined) {
        let bytes = options.kvCacheBytes;
        if (bytes === undefined) {
          const free = (await device.memoryInfo()).freeBytes;
          bytes =
            (free - gpuWeightBytes(config) - GPU_ACTIVATION_RESERVE_BYTES) *
            (options.kvCacheFraction ?? DEFAULT_GPU_KV_FRACTION);
        }
        numBlocks = Math.floor(bytes / one.blockBytes);
        if (options.maxDefaultBlocks !== undefined) numBlocks = Math.min(numBlocks, options.maxDefaultBlocks);
        if (numBlocks < 1) {
          const free = (await device.memoryInfo()).freeBytes;
          throw new OutOfMemoryError(
            `GPU ${device.ordinal} has ${(free / 2 ** 30).toFixed(1)} GiB free; the weights need ` +
              `${(gpuWeightBytes(config) / 2 ** 30).toFixed(1)} GiB and leave no room for a KV pool`,
          );
        }
      }
      const pool = kvPool({
        layers: config.numLayers,
        kvHeads: config.numKvHeads,
        headDim: config.headDim,
        blockSize,
        numBlocks,
        dtype: 'bf16',
        layout,
      });
      kvBuffer = await device.alloc(pool.poolBytes);
      const buffer = kvBuffer;
      raw = nativeSync(
        () =>
          new (loadBinding().binding.CudaLlama)(device.raw, {
            ...nativeModelFields(config),
            numBlocks: pool.numBlocks,
            blockSize: pool.blockSize,
            layout,
            kvBuffer: buffer.raw,
            cublas: libraryCandidates().cublas,
            cudaGraphs: options.cudaGraphs ?? true,
          }),
      );
      const model = raw;
      await native(() => model.init());
      let source = options.weights;
      if (typeof source === 'string')
        source = loadWeights(source, { config, seed: options.seed ?? DEFAULT_DUMMY_SEED });
      else if (typeof source === 'function') source = source();
      const total = expectedTensors(config).length;
      let loaded = 0;
      for await (const tensor of source as AsyncIterable<NamedTensor> | Iterable<NamedTensor>) {
        await native(() => model.setWeight(tensor.name, tensor.data));
        options.onProgress?.(++loaded, total, tensor.name);
      }
      nativeSync(() => model.ready());
      return new CudaModelRunner(model, config, pool, device, buffer, ownsDevice);
    } catch (error) {
      await raw?.dispose().catch(() => {});
      await kvBuffer?.dispose().catch(() => {});
      if (ownsDevice) await device.dispose().catch(() => {});
      throw error;
    }
  }

  /** Whether decode steps replay CUDA graphs, and why not when capturing failed (they then run eagerly). */
  get cudaGraphs(): { active: boolean; reason: string | null } {
    return this.raw.cudaGraphs;
  }

  /**
   * Which attention kernels run: 'flash' (tensor-core prefill and split-context decode, native/kernels/attention.cu:
   * head dims 64 and 128, GQA groups up to 16) or 'reference' (native/kernels/llama.cu: any shape, or
   * TANDEM_ATTENTION=reference).
   */
  get attentionKernels(): 'flash' | 'reference' {
    return this.raw.attentionKernels;
  }

  /**
   * The largest batch (rows of a GEMM) whose GEMMs run through the skinny-GEMM kernels of
   * native/kernels/gemv.cu; larger ones go to cuBLAS. 0 with TANDEM_GEMV=off.
   */
  get gemvMaxBatch(): number {
    return this.raw.gemvMaxBatch;
  }

  /** bf16 bytes the weights take on the GPU. */
  get weightBytes(): number {
    return this.raw.weightBytes;
  }
  get disposed(): boolean {
    return this.raw.disposed;
  }

  /**
   * Runs one step (see ForwardBatch) on the device's stream; passes run one at a time, in call order. Every
   * index is checked before anything is written: a malformed batch rejects with BadArgumentError and leaves
   * the KV pool as it was.
   */
  forward(batch: ForwardBatch): Promise<Float32Array> {
    return native(() => this.raw.forward(...forwardArgs(batch)));
  }

  /**
   * The step with sampling's reductions on the GPU (tandem_sample_* in native/kernels/llama.cu): the best
   * candidates, sums and the plain draw per sequence come back instead of nseq x vocabSize logits.
   */
  async forwardSampled(batch: ForwardBatch, plan: SamplePlan): Promise<SampledLogits> {
    const r = await native(() => this.raw.forwardSampled(...forwardArgs(batch), plan));
    return { vocabSize: this.vocabSize, ...r };
  }

  /** Frees the weights, the activations and the KV pool; closes the device when the runner opened it. */
  async dispose(): Promise<void> {
    if (this.raw.disposed) return;
    await native(() => this.raw.dispose());
    await this.kvDeviceBuffer.dispose().catch(() => {});
    if (this.ownsDevice) await this.device.dispose();
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.dispose();
  }
}

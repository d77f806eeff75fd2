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
import { closeSync, openSync } from 'node:fs';
import { BadArgumentError, CheckpointError, native, nativeSync, OutOfMemoryError, TandemError } from '../errors.js';
import { CudaDevice, type DeviceBuffer } from '../cuda/index.js';
import { checkInteger, kvPool, type KvLayout, type KvPool, type KvPoolSpec } from '../kv/pool.js';
import { loadBinding, type RawCudaLlama } from '../native/binding.js';
import { libraryCandidates } from '../native/libraries.js';
import {
  DEFAULT_DUMMY_SEED,
  nativeModelFields,
  runnerConfigAndLayout,
  runnerPoolSpec,
  type NamedTensor,
  type WeightSource,
} from './cpu.js';
import { expectedTensors, type ModelConfig } from './model/config.js';
import { dummyTensorRecipe, isDummyModel } from './model/dummy.js';
import { checkCheckpointTensors, tensorElements, weightManifest, type ManifestTensor } from './model/manifest.js';
import { openSafetensors } from './model/safetensors.js';
import { ByteProgress, StartPhases, type StartLog } from './model/progress.js';
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
  /**
   * The weights as tensors, or a name: `dummy:<preset>` (generated on the GPU, the values `loadWeights` gives) or a
   * safetensors checkpoint (directory, file or index; read from disk straight into pinned staging).
   */
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
  /** Start-up log: each phase's time and the weights' progress (model/progress.ts). */
  log?: StartLog;
}

/** bf16 bytes of a config's weights (what the GPU runner allocates, give or take alignment). */
export function gpuWeightBytes(config: ModelConfig): number {
  let elements = 0;
  for (const t of expectedTensors(config)) elements += t.shape.reduce((a, b) => a * b, 1);
  return elements * 2;
}

/** How often the checkpoint reader's byte count is looked at while a file loads. */
const CHECKPOINT_POLL_MS = 250;

/**
 * Reads a safetensors checkpoint straight into the weights on the GPU: checked against the manifest first, then
 * one native call per file (CudaLlama::loadFromFile: 64 MiB sequential reads into two pinned buffers, one read
 * while the other is copied), with no host copy of the file and progress from the native reader's byte count.
 */
async function loadCheckpoint(
  model: RawCudaLlama,
  path: string,
  manifest: readonly ManifestTensor[],
  log: StartLog | undefined,
  onTensors: (count: number, lastName: string) => void,
): Promise<void> {
  const checkpoint = openSafetensors(path);
  try {
    checkCheckpointTensors(manifest, checkpoint, path);
    type FileTensor = { name: string; offset: number; bytes: number; dtype: 'BF16' | 'F16' | 'F32' };
    const byFile = new Map<string, FileTensor[]>();
    let totalBytes = 0;
    for (const t of manifest) {
      const info = checkpoint.info(t.name);
      if (info.dtype !== 'BF16' && info.dtype !== 'F16' && info.dtype !== 'F32')
        throw new CheckpointError(
          `${info.file}: tensor "${t.name}" is stored as ${info.dtype}; the engines read BF16, F16 and F32`,
        );
      const list = byFile.get(info.file) ?? [];
      list.push({ name: t.name, offset: info.offset, bytes: info.byteLength, dtype: info.dtype });
      byFile.set(info.file, list);
      totalBytes += info.byteLength;
    }
    const progress = new ByteProgress('loading weights', totalBytes, log);
    for (const [file, tensors] of byFile) {
      const fd = openSync(file, 'r');
      const bytesDone = new Float64Array(1);
      let counted = 0;
      const count = () => {
        progress.add(bytesDone[0]! - counted);
        counted = bytesDone[0]!;
      };
      const poll = setInterval(count, CHECKPOINT_POLL_MS);
      try {
        await native(() => model.loadFromFile(fd, tensors, bytesDone));
      } catch (error) {
        if (error instanceof TandemError && error.code === 'TANDEM_BAD_CHECKPOINT')
          throw new CheckpointError(`${file}: ${error.message}`);
        throw error;
      } finally {
        clearInterval(poll);
        closeSync(fd);
      }
      count();
      onTensors(tensors.length, tensors.at(-1)!.name);
    }
    progress.finish();
  } finally {
    checkpoint.close();
  }
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
    const phases = new StartPhases(options.log);
    const device =
      typeof given === 'number' ? await phases.run(`open CUDA device ${given}`, () => CudaDevice.open(given)) : given;
    let kvBuffer: DeviceBuffer | undefined;
    let raw: RawCudaLlama | undefined;
    try {
      await phases.run('load kernels', () => device.loadKernels());
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
      kvBuffer = await phases.run(
        `allocate KV pool (${numBlocks} blocks, ${(pool.poolBytes / 1e9).toFixed(1)} GB)`,
        () => device.alloc(pool.poolBytes),
      );
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
            cublasLt: libraryCandidates().cublasLt,
            cudaGraphs: options.cudaGraphs ?? true,
          }),
      );
      const model = raw;
      await phases.run('cuBLAS and weight memory', () => native(() => model.init()));
      const manifest = weightManifest(config);
      const total = manifest.length;
      let loaded = 0;
      const source = options.weights;
      if (typeof source === 'string' && isDummyModel(source)) {
        // Generated in place by a kernel: the same values as the host generator, none of it crosses PCIe.
        const seed = options.seed ?? DEFAULT_DUMMY_SEED;
        const progress = new ByteProgress('generating dummy weights', model.weightBytes, options.log);
        for (const t of manifest) {
          await native(() => model.fillDummy(t.name, dummyTensorRecipe(config, seed, t.name)));
          progress.add(tensorElements(t) * 2);
          options.onProgress?.(++loaded, total, t.name);
        }
        progress.finish();
      } else if (typeof source === 'string') {
        await loadCheckpoint(model, source, manifest, options.log, (tensors, name) => {
          loaded += tensors;
          options.onProgress?.(loaded, total, name);
        });
      } else {
        const tensors = typeof source === 'function' ? source() : source;
        const progress = new ByteProgress('loading weights', model.weightBytes, options.log);
        for await (const tensor of tensors as AsyncIterable<NamedTensor> | Iterable<NamedTensor>) {
          await native(() => model.setWeight(tensor.name, tensor.data));
          progress.add(tensor.data.length * 2);
          options.onProgress?.(++loaded, total, tensor.name);
        }
        progress.finish();
      }
      nativeSync(() => model.ready());
      options.log?.(`GPU model runner ready in ${phases.elapsedMs().toFixed(0)} ms`);
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
   * Which attention kernels run: 'flash2' (native/kernels/attention.cu's second kernels: 128-row prefill tiles,
   * one-launch split decode; head dims 64 and 128, GQA groups 1, 2, 4, 8), 'flash' (the first ones: head dims 64
   * and 128, GQA groups up to 16, or TANDEM_ATTENTION=flash1) or 'reference' (native/kernels/llama.cu: any shape,
   * or TANDEM_ATTENTION=reference).
   */
  get attentionKernels(): 'flash2' | 'flash' | 'reference' {
    return this.raw.attentionKernels;
  }

  /** One weight tensor's bf16 bit patterns as the GPU holds them (tests compare them with the host's values). */
  readWeightBf16(name: string): Promise<Uint16Array> {
    return native(() => this.raw.readWeight(name));
  }

  /**
   * The largest batch (rows of a GEMM) whose GEMMs run through the skinny-GEMM kernels of
   * native/kernels/gemv.cu; larger ones go to cuBLAS. 0 with TANDEM_GEMV=off.
   */
  get gemvMaxBatch(): number {
    return this.raw.gemvMaxBatch;
  }

  /**
   * The GEMMs above the GEMV: 'lt' (cublasLtMatmul with the heuristic's algorithm per shape) or 'gemmex'
   * (cublasGemmEx). TANDEM_GEMM=lt|gemmex; by default 'lt' where libcublasLt loads.
   */
  get gemmPath(): 'lt' | 'gemmex' {
    return this.raw.gemmPath;
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

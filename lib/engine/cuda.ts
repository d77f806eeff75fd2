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
 *
 * Tensor parallelism (issue 25; `parallel: { tp }`): a runner group of tp ranks, each a native CudaLlama holding its
 * slice of the model (lib/engine/cuda-parallel.ts) on its own CudaDevice (own thread and stream), its own KV pool of
 * its kv heads, the ranks summing partial results through a communicator injected into the native layer step: every
 * rank on one device through a local reduction (so TP 2 is checked against TP 1 on one GPU), or each rank on its own
 * GPU (`devices: [0, 1]`) through NCCL (native/src/engine/cuda_llama_nccl.h). forward() drives every rank with the
 * same batch and returns rank 0's logits. Rank r's KV pool is lib/kv's rank pool (tpSize tp, tpRank r:
 * `kvRankPoolSpecs[r]`, memory `kvDeviceBuffers[r]`); a worker registers each as a region and kvRankTransferPieces
 * maps head slices between them and a peer's pools.
 *
 * Pipeline parallelism (`parallel: { tp, pp }`, lib/engine/cuda-pipeline.ts): pp stages of tp such ranks, each stage
 * its layers and a KV pool of them; forward() splits a step into micro-batches handed from stage to stage and returns
 * the last stage's logits. The rank lists (kvRankPoolSpecs, kvDeviceBuffers, tensorShards, takeCollectiveTime) are
 * then stage-major: rank stage * tp + r.
 */
import { closeSync, openSync } from 'node:fs';
import {
  BadArgumentError,
  CheckpointError,
  CudaUnavailableError,
  DisposedError,
  native,
  nativeSync,
  NcclUnavailableError,
  OutOfMemoryError,
  TandemError,
} from '../errors.js';
import { CudaDevice, probeCuda, type DeviceBuffer } from '../cuda/index.js';
import { DEFAULT_COLLECTIVE_TIMEOUT_MS, ncclInfo } from '../collectives/index.js';
import { checkInteger, kvPool, type KvLayout, type KvPool, type KvPoolSpec } from '../kv/pool.js';
import {
  type GemmTuning,
  loadBinding,
  type DecodeAttention,
  type RawCollectiveTime,
  type RawCudaLlama,
  type RawCudaTpGroup,
  type RawTensorShard,
} from '../native/binding.js';
import { libraryCandidates } from '../native/libraries.js';
import {
  DEFAULT_DUMMY_SEED,
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
import {
  checkCudaTensorParallel,
  checkTpDevicesPresent,
  kvBlocksFromFreeMemory,
  rankWeightBytes,
  cudaLlamaFields,
  sliceHostTensor,
  tpPlacement,
  type TpCommunicatorKind,
  type TpPlacement,
} from './cuda-parallel.js';
import { checkCudaExpertParallel, CudaExpertRanks } from './cuda-experts.js';
import { ExpertBalancer, checkEplbPolicy, type EplbPolicy } from '../moe/policy.js';
import type { ExpertPlacement } from '../moe/eplb.js';
import type { ExpertPlacementChange } from './cpu.js';
import { checkCudaPipeline, openCudaPipeline, stagePoolSpec, type CudaPipeline } from './cuda-pipeline.js';

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
  /** Bytes of KV pool when numBlocks is absent (with tensor parallelism: all ranks' pools together). */
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
  /**
   * Tensor parallelism: `tp` ranks (default 1), checked against the model before any GPU memory is taken
   * (ParallelLayoutError). Each rank opens its own CudaDevice on its ordinal; decode steps run eagerly (no CUDA
   * graphs) with more than one rank.
   * Pipeline parallelism: `pp` stages (default 1) of tp ranks each, every stage its share of the layers and a KV
   * pool of those (lib/engine/cuda-pipeline.ts); decode steps run eagerly with more than one stage.
   */
  parallel?: { tp: number; pp?: number; ep?: number };
  /**
   * The device ordinal of each rank, stage-major with pipeline stages (default: `device`'s for all): all the same (the
   * local communicator) or all different (NCCL, one GPU per rank; checked against the GPUs this host has; pipeline
   * stages on one GPU only).
   */
  devices?: number[];
  /**
   * How the ranks exchange partial results: 'local' (every rank on one GPU) or 'nccl' (one GPU per rank; needs
   * libnccl.so.2). Default: 'local' when every rank shares a device, 'nccl' otherwise. 'nccl' with one rank runs the
   * sharded step through a one-rank NCCL communicator (the NCCL path one GPU can run).
   */
  communicator?: TpCommunicatorKind;
  /**
   * Online expert load balancing of an MoE model (lib/moe's EplbPolicy, as CpuModelRunner's `eplb`): every expert-
   * parallel rank gets `redundantSlotsPerRank` extra slots (also one rank, ep 1: replicas within it), each pass's
   * load feeds an ExpertBalancer, and a placement it decides on is applied before the pass resolves (lib/engine/
   * cuda-experts.ts).
   */
  eplb?: EplbPolicy;
}

/** A tensor-parallel rank other than rank 0: its model, device and KV pool. */
interface TpPeer {
  raw: RawCudaLlama;
  device: CudaDevice;
  kvBuffer: DeviceBuffer;
  pool: KvPool;
  ownsDevice: boolean;
}

/** bf16 bytes of a config's weights (what the GPU runner allocates, give or take alignment). */
export function gpuWeightBytes(config: ModelConfig): number {
  let elements = 0;
  for (const t of expectedTensors(config)) elements += t.shape.reduce((a, b) => a * b, 1);
  return elements * 2;
}

/** A rank pool's KvPoolSpec (bf16, NHD; tpSize and tpRank when the runner has several ranks). */
function rankPoolSpec(pool: KvPool): KvPoolSpec {
  return {
    ...runnerPoolSpec(pool, 'bf16'),
    ...(pool.tpSize > 1 ? { tpSize: pool.tpSize, tpRank: pool.tpRank } : {}),
  };
}

/** How often the checkpoint reader's byte count is looked at while a file loads. */
const CHECKPOINT_POLL_MS = 250;

/**
 * Reads a safetensors checkpoint straight into the weights on the GPU: checked against the manifest first, then
 * one native call per file (CudaLlama::loadFromFile: 64 MiB sequential reads into two pinned buffers, one read
 * while the other is copied), with no host copy of the file and progress from the native reader's byte count.
 */
export async function loadCheckpoint(
  model: RawCudaLlama,
  path: string,
  manifest: readonly ManifestTensor[],
  log: StartLog | undefined,
  onTensors: (count: number, lastName: string) => void,
  /** The tensors this model reads (an expert-parallel rank: its own experts'; a pipeline stage: its layers'); all of them by default. */
  holds: (name: string) => boolean = () => true,
): Promise<void> {
  const checkpoint = openSafetensors(path);
  try {
    checkCheckpointTensors(manifest, checkpoint, path);
    type FileTensor = { name: string; offset: number; bytes: number; dtype: 'BF16' | 'F16' | 'F32' };
    const byFile = new Map<string, FileTensor[]>();
    let totalBytes = 0;
    for (const t of manifest) {
      if (!holds(t.name)) continue;
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

/** One of the rank models loadRankWeights fills. */
export interface WeightRank {
  model: RawCudaLlama;
  /** sliceHostTensor's tp and rank: the size of its tensor-parallel group (an expert-parallel group: its attention's) and its place in it. */
  tpSize: number;
  tpRank: number;
  /**
   * Whether its checkpoint files count toward onProgress: one rank of each set of ranks that together read every
   * tensor (a tied embedding on two pipeline stages is read twice: the count is capped at the total).
   */
  countsProgress: boolean;
}

/**
 * Loads a model's weights into its rank models (tensor-parallel ranks, expert-parallel ranks, pipeline stages):
 * each rank gets the tensors it holds (RawCudaLlama.holds), each its own slice of them. Dummy weights are generated
 * on every holder; a checkpoint is read by every rank from the files (the first rank logs its bytes); host tensors
 * are sliced for each holder. onProgress counts manifest tensors and reports each count once.
 */
export async function loadRankWeights(
  ranks: readonly WeightRank[],
  config: ModelConfig,
  options: Pick<CudaModelRunnerOptions, 'weights' | 'seed' | 'log' | 'onProgress'>,
  where: string,
): Promise<void> {
  const manifest = weightManifest(config);
  const total = manifest.length;
  let loaded = 0;
  const source = options.weights;
  const weightBytes = ranks.reduce((sum, r) => sum + r.model.weightBytes, 0);
  if (typeof source === 'string' && isDummyModel(source)) {
    // Each rank generates its slice of the same tensors as one rank would (dummy_init.cu).
    const seed = options.seed ?? DEFAULT_DUMMY_SEED;
    const progress = new ByteProgress('generating dummy weights', weightBytes, options.log);
    for (const t of manifest) {
      const recipe = dummyTensorRecipe(config, seed, t.name);
      await Promise.all(
        ranks.filter((r) => r.model.holds(t.name)).map((r) => native(() => r.model.fillDummy(t.name, recipe))),
      );
      progress.add(tensorElements(t) * 2);
      options.onProgress?.(++loaded, total, t.name);
    }
    progress.finish();
  } else if (typeof source === 'string') {
    // Each rank reads its slice of every tensor it holds from the files (rows, or columns of every row).
    await Promise.all(
      ranks.map((rank, i) =>
        loadCheckpoint(
          rank.model,
          source,
          manifest,
          i === 0 ? options.log : undefined,
          (tensors, name) => {
            if (!rank.countsProgress) return;
            const next = Math.min(total, loaded + tensors);
            if (next === loaded) return;
            loaded = next;
            options.onProgress?.(loaded, total, name);
          },
          (name) => rank.model.holds(name),
        ),
      ),
    );
  } else {
    const byName = new Map(manifest.map((t) => [t.name, t]));
    const tensors = typeof source === 'function' ? source() : source;
    const progress = new ByteProgress('loading weights', weightBytes, options.log);
    for await (const tensor of tensors as AsyncIterable<NamedTensor> | Iterable<NamedTensor>) {
      const entry = byName.get(tensor.name);
      if (!entry) throw new BadArgumentError(`${where}: tensor '${tensor.name}' is not part of this model`);
      await Promise.all(
        ranks
          .filter((r) => r.model.holds(tensor.name))
          .map((r) =>
            native(() =>
              r.model.setWeight(tensor.name, sliceHostTensor(config, r.tpSize, r.tpRank, entry, tensor.data)),
            ),
          ),
      );
      progress.add(tensor.data.length * 2);
      options.onProgress?.(++loaded, total, tensor.name);
    }
    progress.finish();
  }
}

/**
 * Checks, before any device is opened, that the host can run the ranks: NCCL present for the NCCL communicator
 * (NcclUnavailableError naming libnccl.so.2 otherwise), a usable CUDA driver, and every ordinal one of its GPUs.
 */
async function checkTpHost(ordinals: readonly number[], communicator: TpCommunicatorKind, where: string) {
  if (communicator === 'nccl') {
    const nccl = await ncclInfo();
    if (!nccl.available) throw new NcclUnavailableError(nccl.reason ?? 'libnccl.so.2 could not be loaded');
  }
  const cuda = await probeCuda();
  if (!cuda.available) throw new CudaUnavailableError(cuda.reason ?? 'unknown reason');
  checkTpDevicesPresent(ordinals, cuda.deviceCount, where);
}

/** Waits for every rank's promise; rejects with the first error that is not a rank stopped by another's failure. */
async function firstCause<T>(promises: Promise<T>[]): Promise<T[]> {
  const results = await Promise.allSettled(promises);
  const errors = results.flatMap((r) => (r.status === 'rejected' ? [r.reason as unknown] : []));
  if (errors.length > 0) throw errors.find((e) => !(e instanceof DisposedError)) ?? errors[0];
  return results.map((r) => (r as PromiseFulfilledResult<T>).value);
}

export class CudaModelRunner implements ModelRunner {
  readonly vocabSize: number;
  readonly blockSize: number;
  readonly numBlocks: number;
  readonly maxPositions: number;
  /** The KV pool as lib/kv describes it (bf16, NHD): rank 0's (of the first stage, its layers only, with pipeline stages). */
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
    /** Tensor-parallel ranks 1..tp-1 (none for one rank). */
    private readonly peers: readonly TpPeer[] = [],
    /** MoE models: the experts of every rank, their load and placement (lib/engine/cuda-experts.ts). */
    private readonly experts?: CudaExpertRanks,
    /** Pipeline stages (lib/engine/cuda-pipeline.ts), whose first rank is `raw`; none without pipeline parallelism. */
    private readonly pipeline?: CudaPipeline,
  ) {
    this.vocabSize = config.vocabSize;
    this.blockSize = pool.blockSize;
    this.numBlocks = pool.numBlocks;
    this.maxPositions = config.maxPositionEmbeddings;
    this.kvPool = pool;
    this.kvPoolSpec = pipeline ? stagePoolSpec(pool) : rankPoolSpec(pool);
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
    const tp = checkCudaTensorParallel(config, options.parallel?.tp ?? 1, where);
    const pp = options.parallel?.pp ?? 1;
    if (pp !== 1) return CudaModelRunner.createPipeline(options, config, layout, blockSize, tp, pp);
    const { ep, balancer } = CudaModelRunner.checkExperts(options, config, tp, where);
    const given = options.device ?? 0;
    const placement = tpPlacement(
      Math.max(tp, ep),
      typeof given === 'number' ? given : given.ordinal,
      options.devices,
      options.communicator,
      where,
    );
    if (tp > 1 || ep > 1 || balancer || placement.communicator === 'nccl')
      return CudaModelRunner.createTensorParallel(options, config, layout, blockSize, tp, placement, ep, balancer);
    const ownsDevice = typeof given === 'number';
    const phases = new StartPhases(options.log);
    const ordinal = placement.ordinals[0]!;
    const device =
      typeof given === 'number'
        ? await phases.run(`open CUDA device ${ordinal}`, () => CudaDevice.open(ordinal))
        : given;
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
            ...cudaLlamaFields(config, pool, layout, buffer, options.cudaGraphs),
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
      const experts = config.moe ? new CudaExpertRanks([model], config) : undefined;
      return new CudaModelRunner(model, config, pool, device, buffer, ownsDevice, [], experts);
    } catch (error) {
      await raw?.dispose().catch(() => {});
      await kvBuffer?.dispose().catch(() => {});
      if (ownsDevice) await device.dispose().catch(() => {});
      throw error;
    }
  }

  /**
   * create() with tp > 1 ranks: every rank's device opened, kernels loaded, KV pool allocated and model built before
   * the weights (each rank generating or reading only its slice); all of it disposed again on any failure.
   */
  private static async createTensorParallel(
    options: CudaModelRunnerOptions,
    config: ModelConfig,
    layout: KvLayout,
    blockSize: number,
    tp: number,
    { ordinals, communicator }: TpPlacement,
    ep = 1,
    balancer?: ExpertBalancer,
  ): Promise<CudaModelRunner> {
    const where = 'CudaModelRunner.create';
    const given = options.device ?? 0;
    await checkTpHost(ordinals, communicator, where);
    // With expert parallelism the group is ep ranks (tp 1: attention replicated on each; tp = ep: split).
    const tpSize = tp;
    tp = Math.max(tp, ep);
    const phases = new StartPhases(options.log);
    interface Rank {
      device: CudaDevice;
      ownsDevice: boolean;
      kvBuffer?: DeviceBuffer;
      raw?: RawCudaLlama;
      pool?: KvPool;
    }
    const ranks: Rank[] = [];
    // Rank r's pool holds its kv heads (lib/kv's rank pool: tpSize tp, tpRank r), the heads tensorShard gives it.
    const poolOf = (rank: number, numBlocks: number) =>
      kvPool({
        layers: config.numLayers,
        kvHeads: config.numKvHeads,
        headDim: config.headDim,
        blockSize,
        numBlocks,
        dtype: 'bf16',
        layout,
        tpSize,
        tpRank: tpSize > 1 ? rank : 0,
      });
    try {
      for (let r = 0; r < tp; r++) {
        // Rank 0 may use the caller's device; every other rank opens its own (its own thread and stream).
        const device =
          r === 0 && typeof given !== 'number'
            ? given
            : await phases.run(`open CUDA device ${ordinals[r]} (rank ${r})`, () => CudaDevice.open(ordinals[r]!));
        ranks.push({ device, ownsDevice: !(r === 0 && typeof given !== 'number') });
        await phases.run(`load kernels (rank ${r})`, () => device.loadKernels());
      }
      let numBlocks = options.numBlocks;
      if (numBlocks === undefined) {
        let tightest = { numBlocks: 0, ordinal: ordinals[0]!, freeBytes: 0, weightBytes: 0 };
        if (options.kvCacheBytes !== undefined) {
          // One block's bytes over all ranks (each holds its kv heads).
          let blockBytes = 0;
          for (let r = 0; r < tp; r++) blockBytes += poolOf(r, 1).blockBytes;
          tightest.numBlocks = Math.floor(options.kvCacheBytes / blockBytes);
        } else {
          // Per GPU: its free memory less the weights of the ranks on it (each its slice), the least over the GPUs.
          const memory = [];
          for (let r = 0; r < tp; r++)
            memory.push({
              ordinal: ordinals[r]!,
              freeBytes: (await ranks[r]!.device.memoryInfo()).freeBytes,
              // Expert-parallel ranks (tpSize < tp) hold attention whole and their experts: the model's bytes split
              // evenly is close enough (the replicated attention and redundant slots fit the activation reserve).
              weightBytes: tpSize === tp ? rankWeightBytes(config, tp, r) : gpuWeightBytes(config) / tp,
              blockBytes: poolOf(r, 1).blockBytes,
            });
          tightest = kvBlocksFromFreeMemory(
            memory,
            GPU_ACTIVATION_RESERVE_BYTES,
            options.kvCacheFraction ?? DEFAULT_GPU_KV_FRACTION,
          );
        }
        numBlocks = tightest.numBlocks;
        if (options.maxDefaultBlocks !== undefined) numBlocks = Math.min(numBlocks, options.maxDefaultBlocks);
        if (numBlocks < 1) {
          const free = (await ranks[ordinals.indexOf(tightest.ordinal)]!.device.memoryInfo()).freeBytes;
          throw new OutOfMemoryError(
            `GPU ${tightest.ordinal} has ${(free / 2 ** 30).toFixed(1)} GiB free; the weights of its tensor-parallel ` +
              `rank(s) need ${(tightest.weightBytes / 2 ** 30).toFixed(1)} GiB and leave no room for a KV pool`,
          );
        }
      }
      const group: RawCudaTpGroup = nativeSync(
        () =>
          new (loadBinding().binding.CudaTpGroup)(
            tp,
            communicator === 'nccl'
              ? { communicator, nccl: libraryCandidates().nccl, timeoutMs: DEFAULT_COLLECTIVE_TIMEOUT_MS }
              : { communicator },
          ),
      );
      for (let r = 0; r < tp; r++) {
        const rank = ranks[r]!;
        const pool = poolOf(r, numBlocks);
        rank.pool = pool;
        const buffer = await phases.run(
          `allocate KV pool of rank ${r} (${numBlocks} blocks, ${(pool.poolBytes / 1e9).toFixed(1)} GB)`,
          () => rank.device.alloc(pool.poolBytes),
        );
        rank.kvBuffer = buffer;
        rank.raw = nativeSync(
          () =>
            new (loadBinding().binding.CudaLlama)(rank.device.raw, {
              ...cudaLlamaFields(config, pool, layout, buffer, options.cudaGraphs),
              tp: { group, rank: r },
              ...CudaModelRunner.expertOption(config, tpSize, ep, balancer),
            }),
        );
      }
      const models = ranks.map((rank) => rank.raw!);
      // With NCCL each rank joins the group here; a rank that fails breaks the group, so the others' DisposedError
      // is not the cause: the first other error is reported.
      // A rank whose init fails before it joins would leave the others waiting for it: disposing the models breaks
      // the group at once.
      const breakGroup = () => Promise.all(models.map((m) => m.dispose().catch(() => {})));
      await phases.run(`cuBLAS, weight memory and the ${communicator} communicator`, () =>
        firstCause(
          models.map((m) =>
            native(() => m.init()).catch(async (error: unknown) => {
              await breakGroup();
              throw error;
            }),
          ),
        ),
      );
      // Expert-parallel ranks (tpSize < tp) hold their own experts only; rank 0 holds every tensor but others'
      // experts and counts the checkpoint's progress.
      await loadRankWeights(
        models.map((model, r) => ({ model, tpSize, tpRank: r, countsProgress: r === 0 })),
        config,
        options,
        where,
      );
      for (const m of models) nativeSync(() => m.ready());
      const experts = config.moe ? new CudaExpertRanks(models, config, balancer) : undefined;
      await experts?.fillRedundantSlots();
      options.log?.(
        `GPU model runner (${tp} rank${tp === 1 ? '' : 's'} on GPU${new Set(ordinals).size > 1 ? 's' : ''} ` +
          `${[...new Set(ordinals)].join(', ')}, ${communicator} communicator) ready in ${phases.elapsedMs().toFixed(0)} ms`,
      );
      const [first, ...rest] = ranks;
      const peers = rest.map((rank) => ({
        raw: rank.raw!,
        device: rank.device,
        kvBuffer: rank.kvBuffer!,
        pool: rank.pool!,
        ownsDevice: rank.ownsDevice,
      }));
      return new CudaModelRunner(
        first!.raw!,
        config,
        first!.pool!,
        first!.device,
        first!.kvBuffer!,
        first!.ownsDevice,
        peers,
        experts,
      );
    } catch (error) {
      await Promise.all(ranks.map((rank) => rank.raw?.dispose().catch(() => {})));
      for (const rank of ranks) {
        await rank.kvBuffer?.dispose().catch(() => {});
        if (rank.ownsDevice) await rank.device.dispose().catch(() => {});
      }
      throw error;
    }
  }

  /**
   * create() with pp > 1 pipeline stages (x tp ranks each): lib/engine/cuda-pipeline.ts opens them; `raw`, the pool
   * and the device of the runner are the first stage's rank 0's.
   */
  private static async createPipeline(
    options: CudaModelRunnerOptions,
    config: ModelConfig,
    layout: KvLayout,
    blockSize: number,
    tp: number,
    pp: unknown,
  ): Promise<CudaModelRunner> {
    const layoutChecked = checkCudaPipeline(config, tp, pp, 'CudaModelRunner.create');
    const pipeline = await openCudaPipeline(options, config, layout, blockSize, tp, layoutChecked.pp);
    const first = pipeline.stages[0]![0]!;
    return new CudaModelRunner(
      first.raw,
      config,
      first.pool,
      first.device,
      first.kvBuffer,
      first.ownsDevice,
      [],
      undefined,
      pipeline,
    );
  }

  /** The number of tensor-parallel ranks (of each pipeline stage; 1: the whole model on one runner). */
  get tensorParallelSize(): number {
    return this.pipeline ? this.pipeline.tp : this.peers.length + 1;
  }

  /** The number of pipeline stages (1: every layer on each rank). */
  get pipelineParallelSize(): number {
    return this.pipeline?.pp ?? 1;
  }

  /** The GPU of each tensor-parallel rank, rank 0 first (one entry for one rank). */
  get deviceOrdinals(): number[] {
    return [this.device.ordinal, ...this.peers.map((p) => p.device.ordinal)];
  }

  /**
   * The KV pool of each tensor-parallel rank, rank 0 first (one for a single rank): rank r's holds its kv heads
   * (lib/kv's rank pool, tpSize and tpRank set; one head each when there are more ranks than kv heads) in
   * `kvDeviceBuffers[r]`. A transfer agent registers each buffer as a region, and kvRankTransferPieces maps head
   * slices between these and a peer's pools. `kvPoolSpec` is rank 0's.
   */
  get kvRankPoolSpecs(): KvPoolSpec[] {
    if (this.pipeline) return this.pipeline.ranks.map((r) => stagePoolSpec(r.pool));
    return [this.kvPoolSpec, ...this.peers.map((p) => rankPoolSpec(p.pool))];
  }

  /** Each rank's KV pool memory, rank 0 first (kvRankPoolSpecs describes them); `kvDeviceBuffer` is rank 0's. */
  get kvDeviceBuffers(): DeviceBuffer[] {
    if (this.pipeline) return this.pipeline.ranks.map((r) => r.kvBuffer);
    return [this.kvDeviceBuffer, ...this.peers.map((p) => p.kvBuffer)];
  }

  /** What each tensor-parallel rank holds, rank 0 first: [start, count] of heads, kv heads, channels, vocabulary. */
  get tensorShards(): RawTensorShard[] {
    if (this.pipeline) return this.pipeline.ranks.map((r) => r.raw.tensorParallel!);
    return [this.raw, ...this.peers.map((p) => p.raw)].map((m) => m.tensorParallel!);
  }

  /**
   * Stream time (ms) each tensor-parallel rank, rank 0 first, spent in its collectives over the passes since the last
   * call, and a reset: all-reduces (`allReduceMs`) and the logits gather (`gatherMs`), timed with CUDA events around
   * each on the rank's stream, so a rank's wait for the others' inputs is in it (barrierMs and handoverMs are 0: the
   * GPU ranks have neither). The first call starts the timing and gives zeros; zeros for one rank. What
   * bench:engine's "coll %" divides by the step time on the GPU.
   */
  async takeCollectiveTime(): Promise<RawCollectiveTime[]> {
    if (this.pipeline) return this.pipeline.takeCollectiveTime();
    const times = await Promise.all(
      [this.raw, ...this.peers.map((p) => p.raw)].map((m) => native(() => m.takeCollectiveTime())),
    );
    return times.map((t) => ({ allReduceMs: t.allReduceMs, gatherMs: t.gatherMs, barrierMs: 0, handoverMs: 0 }));
  }

  /** Whether decode steps replay CUDA graphs, and why not when capturing failed (they then run eagerly). */
  get cudaGraphs(): { active: boolean; reason: string | null } {
    return this.raw.cudaGraphs;
  }

  /**
   * Which attention kernels run: 'prefill3' (native/kernels/attention.cu's second kernels, one-launch split decode,
   * with prefill through tandem_flash_prefill3: 128-row tiles on 4 warps of 32 query rows; head dims 64 and 128, GQA
   * groups 1, 2, 4, 8: the default), 'flash2' (the same with prefill through tandem_flash_prefill2: 8 warps of 16
   * rows; TANDEM_ATTENTION=prefill2, or a fatbin without prefill3),
   * 'flash' (the first ones: head dims 64 and 128, GQA groups up to 16, or TANDEM_ATTENTION=flash1) or 'reference'
   * (native/kernels/llama.cu: any shape, or TANDEM_ATTENTION=reference).
   */
  get attentionKernels(): 'prefill3' | 'flash2' | 'flash' | 'reference' {
    return this.raw.attentionKernels;
  }

  /**
   * Which decode kernel a decode step runs (null without the flash kernels): `small` for steps of at most
   * `smallMaxRows` sequences (decode2: splits read straight into registers), `medium` up to `mediumMaxRows` and
   * `large` above (decode3, the GQA group on tensor cores, for groups 4 and 8; decode1 otherwise);
   * TANDEM_ATTENTION=decode1|decode2|decode3 forces all three.
   */
  get decodeAttention(): DecodeAttention | null {
    return this.raw.decodeAttention;
  }

  /**
   * One weight tensor's bf16 bit patterns as the GPU holds them (tests compare them with the host's values): tensor-
   * parallel rank `rank`'s slice (default rank 0; the whole tensor with one rank).
   */
  readWeightBf16(name: string, rank = 0): Promise<Uint16Array> {
    const models = this.pipeline ? this.pipeline.ranks.map((r) => r.raw) : [this.raw, ...this.peers.map((p) => p.raw)];
    const model = models[rank];
    if (!model)
      return Promise.reject(new BadArgumentError(`readWeightBf16: rank ${rank} is not one of 0..${models.length - 1}`));
    return native(() => model.readWeight(name));
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

  /**
   * cuBLASLt autotuning (TANDEM_GEMM_TUNE, on by default on the lt path: each new GEMM shape keeps the fastest of
   * the heuristic's top 8, timed on its first run, within a 2 s budget per runner) and whether the gate_up GEMM
   * writes bf16 (TANDEM_GATEUP_BF16, on by default); shapes tuned and milliseconds spent so far.
   */
  get gemmTuning(): GemmTuning {
    return { ...this.raw.gemmTuning };
  }

  /** bf16 bytes the weights take on the GPU (all tensor-parallel ranks together). */
  get weightBytes(): number {
    if (this.pipeline) return this.pipeline.ranks.reduce((sum, r) => sum + r.raw.weightBytes, 0);
    return this.peers.reduce((sum, p) => sum + p.raw.weightBytes, this.raw.weightBytes);
  }
  get disposed(): boolean {
    return this.raw.disposed;
  }

  /**
   * Runs one step (see ForwardBatch) on the device's stream; passes run one at a time, in call order. Every
   * index is checked before anything is written: a malformed batch rejects with BadArgumentError and leaves
   * the KV pool as it was.
   */
  async forward(batch: ForwardBatch): Promise<Float32Array> {
    if (this.pipeline) return this.pipeline.forward(batch, this.vocabSize);
    if (this.peers.length === 0) {
      const logits = await native(() => this.raw.forward(...forwardArgs(batch)));
      await this.experts?.afterPass();
      return logits;
    }
    const args = forwardArgs(batch);
    const logits = await this.allRanks(
      native(() => this.raw.forward(...args)),
      args,
    );
    await this.experts?.afterPass();
    return logits;
  }

  /**
   * Rank 0's pass (`first`, started) with every other rank's pass of the same batch, which only feeds the
   * collectives; settles once every rank is done, with rank 0's result or the failure that caused the others (a rank
   * that fails stops the group's collectives, so the others fail too, with DisposedError, rather than wait).
   */
  private async allRanks<T>(first: Promise<T>, args: ReturnType<typeof forwardArgs>): Promise<T> {
    const [result] = await firstCause<unknown>([
      first,
      ...this.peers.map((p) => native(() => p.raw.forwardWithoutLogits(...args))),
    ]);
    return result as T;
  }

  /**
   * The step with sampling's reductions on the GPU (tandem_sample_* in native/kernels/llama.cu): the best
   * candidates, sums and the plain draw per sequence come back instead of nseq x vocabSize logits.
   */
  async forwardSampled(batch: ForwardBatch, plan: SamplePlan): Promise<SampledLogits> {
    if (this.pipeline) return this.pipeline.forwardSampled(batch, plan, this.vocabSize);
    if (this.peers.length === 0) {
      const r = await native(() => this.raw.forwardSampled(...forwardArgs(batch), plan));
      await this.experts?.afterPass();
      return { vocabSize: this.vocabSize, ...r };
    }
    const args = forwardArgs(batch);
    const r = await this.allRanks(
      native(() => this.raw.forwardSampled(...args, plan)),
      args,
    );
    await this.experts?.afterPass();
    return { vocabSize: this.vocabSize, ...r };
  }

  /**
   * Checks the expert-parallel layout and the `eplb` policy (ParallelLayoutError / BadArgumentError before any GPU
   * memory is taken): ep divides the experts, tp is 1 or ep, eplb needs an MoE model.
   */
  private static checkExperts(
    options: CudaModelRunnerOptions,
    config: ModelConfig,
    tp: number,
    where: string,
  ): { ep: number; balancer?: ExpertBalancer } {
    const ep = checkCudaExpertParallel(config, tp, options.parallel?.ep ?? 1, where);
    if (options.eplb === undefined) return { ep };
    const policy = checkEplbPolicy({ ...options.eplb });
    if (!config.moe) throw new BadArgumentError(`${where}: eplb needs a mixture-of-experts model`);
    if (policy.redundantSlotsPerRank > config.moe.numExperts)
      throw new BadArgumentError(
        `${where}: eplb.redundantSlotsPerRank is at most the model's ${config.moe.numExperts} experts (got ${policy.redundantSlotsPerRank})`,
      );
    return { ep, balancer: new ExpertBalancer(config.numLayers, config.moe.numExperts, ep, policy) };
  }

  /** The native `ep` option of a rank: experts split over the group, redundant slots, attention replicated. */
  private static expertOption(config: ModelConfig, tpSize: number, ep: number, balancer?: ExpertBalancer) {
    if (!config.moe) return {};
    return {
      ep: {
        size: ep,
        redundantSlots: balancer?.policy.redundantSlotsPerRank ?? 0,
        replicatedAttention: tpSize === 1 && ep > 1,
      },
    };
  }

  /** The number of expert-parallel ranks of an MoE model (1: every expert on every rank). */
  get expertParallelSize(): number {
    return this.experts?.numRanks ?? 1;
  }

  /** With `eplb`: the balancer the runner feeds and follows. */
  get expertBalancer(): ExpertBalancer | undefined {
    return this.experts?.balancer;
  }

  /** With `eplb`: the last automatic placement change that failed (the runner kept its placement, serving on). */
  get eplbError(): Error | undefined {
    return this.experts?.eplbError;
  }

  /**
   * MoE models: the tokens routed to each expert by the passes since the last call, layer-major (numLayers x
   * numExperts; counted on the GPU, read back after each pass), and a reset: what lib/moe's ExpertLoadWindow
   * records. Empty for a dense model.
   */
  takeExpertLoad(): Float64Array {
    return this.experts?.takeExpertLoad() ?? new Float64Array(0);
  }

  /** MoE models: the pairs each expert-parallel rank's slots ran per layer (numLayers x ep) since the last call. */
  takeRankLoad(): Float64Array {
    return this.experts?.takeRankLoad() ?? new Float64Array(0);
  }

  /** MoE models: the expert placement in force (lib/moe's ExpertPlacement), ep ranks x slotsPerRank per layer. */
  get expertPlacement(): ExpertPlacement {
    if (!this.experts) throw new BadArgumentError('expertPlacement: the model is not a mixture-of-experts model');
    return this.experts.placement;
  }

  /**
   * Applies an expert placement between passes (CpuModelRunner.applyExpertPlacement's contract): expert weights
   * copied into the slots whose expert changes (cuMemcpyDtoDAsync on each rank's stream, ranks sharing the device),
   * then the routing tables switch; passes called after this route through the new one, with the same results.
   */
  applyExpertPlacement(placement: ExpertPlacement): Promise<ExpertPlacementChange> {
    if (!this.experts)
      return Promise.reject(
        new BadArgumentError('CudaModelRunner.applyExpertPlacement: the model is not a mixture-of-experts model'),
      );
    return this.experts.apply(placement);
  }

  /** Frees the weights, the activations and the KV pool; closes the device when the runner opened it. */
  async dispose(): Promise<void> {
    if (this.raw.disposed) return;
    if (this.pipeline) return this.pipeline.dispose();
    if (this.peers.length === 0) {
      await native(() => this.raw.dispose());
      await this.kvDeviceBuffer.dispose().catch(() => {});
      if (this.ownsDevice) await this.device.dispose();
      return;
    }
    // Every rank at once: disposing one stops the group's collectives, so no rank waits for a disposed one.
    await Promise.all([this.raw, ...this.peers.map((p) => p.raw)].map((m) => native(() => m.dispose())));
    await this.kvDeviceBuffer.dispose().catch(() => {});
    for (const p of this.peers) await p.kvBuffer.dispose().catch(() => {});
    if (this.ownsDevice) await this.device.dispose();
    for (const p of this.peers) if (p.ownsDevice) await p.device.dispose();
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.dispose();
  }
}

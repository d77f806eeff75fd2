/**
 * Opening a model for serving: its config, tokenizer, a model runner with a paged KV pool, and the engine
 * that schedules requests on it. What `tandem generate` and the workers call.
 */
import { freemem } from 'node:os';
import { BackendUnavailableError, BadArgumentError, ParallelLayoutError } from '../errors.js';
import { kvPool, type KvLayout, type KvPoolSpec } from '../kv/index.js';
import { probeCuda } from '../cuda/index.js';
import { CpuModelRunner, loadWeights, type NamedTensor } from './cpu.js';
import { CudaModelRunner, DEFAULT_GPU_KV_FRACTION } from './cuda.js';
import { checkCudaTensorParallel, tpPlacement } from './cuda-parallel.js';
import { checkCudaExpertParallel } from './cuda-experts.js';
import { checkCudaPipeline } from './cuda-pipeline.js';
import { LlmEngine, type LlmEngineOptions } from './llm-engine.js';
import { expectedTensors, loadModelConfig, type ModelConfig } from './model/config.js';
import { dummyConfig, isDummyModel } from './model/dummy.js';
import { StartPhases, type StartLog } from './model/progress.js';
import {
  checkParallelConfig,
  describeParallel,
  groupSize,
  rankCount,
  SINGLE_RANK,
  type ParallelConfig,
} from './parallel.js';
import { modelTokenizer, type TextTokenizer } from './tokenizer.js';
import type { EplbPolicy } from '../moe/policy.js';

/** Share of free host memory the CPU engine's KV pool takes when neither numBlocks nor kvCacheBytes is given. */
export const DEFAULT_KV_MEMORY_FRACTION = 0.1;
/** The default pool holds at most this many full-length sequences. */
export const DEFAULT_POOL_SEQUENCES = 64;
/** Upper bound of that default pool. */
export const DEFAULT_MAX_KV_BYTES = 2 * 2 ** 30;

export interface OpenModelOptions {
  /** A Hugging Face checkpoint directory, or `dummy:<preset>`. */
  model: string;
  /**
   * 'cpu' runs the fp32 CPU engine; 'cuda' the bf16 GPU engine (an error says why when it cannot run); 'auto'
   * (default) the GPU engine when this machine has a GPU it can use, else the CPU engine.
   */
  device?: 'cpu' | 'cuda' | 'auto';
  /** The GPU (ordinal) of the GPU engine. Default 0. */
  gpu?: number;
  /**
   * The GPU of each tensor-parallel rank of the GPU engine (default: `gpu` for every rank): one GPU for all (the
   * local communicator) or one per rank (NCCL between them; a graph pool's gpusPerReplica gives a replica its list).
   */
  gpus?: number[];
  /**
   * GPU engine: share of the GPU's free memory, after the weights and GPU_ACTIVATION_RESERVE_BYTES, that the KV
   * pool takes when numBlocks and kvCacheBytes are absent (default DEFAULT_GPU_KV_FRACTION; two workers that
   * share a GPU take less each).
   */
  kvCacheFraction?: number;
  /** Seed of `dummy:` weights. Default 0. */
  seed?: number;
  threads?: number;
  /**
   * Tensor parallel ranks (lib/engine/parallel.ts): each splits every layer's heads and channels. Default 1. The
   * CPU engine runs one native thread per rank; the GPU engine one CudaLlama per rank, every rank on one GPU (the
   * local communicator; at most MAX_LOCAL_TP_RANKS), decode steps without CUDA graphs. The GPU engine takes no
   * pipeline parallelism of an MoE model, and of an MoE model no tensor parallelism of the experts' channels (tp > 1
   * with ep 1): ParallelLayoutError (run those on CPU ranks).
   */
  tensorParallelSize?: number;
  /**
   * Pipeline stages: each runs a contiguous share of the layers. Default 1. The CPU engine runs them as thread
   * groups; the GPU engine as groups of tensorParallelSize CudaLlama ranks on one GPU (lib/engine/cuda-pipeline.ts:
   * at most MAX_LOCAL_PIPELINE_RANKS ranks, dense models), each stage with a KV pool of its layers (kvRankPoolSpecs).
   */
  pipelineParallelSize?: number;
  /**
   * Expert parallel ranks of an MoE model (lib/engine/parallel.ts): each holds numExperts / ep whole experts; they
   * are the tensor-parallel ranks (tp 1: attention replicated on each; tp = ep: split). Default 1. Both engines: the
   * GPU engine runs ep CudaLlama ranks on one GPU (lib/engine/cuda-experts.ts).
   */
  expertParallelSize?: number;
  /**
   * Online expert load balancing (lib/moe's EplbPolicy) of an MoE model on expert-parallel ranks
   * (expertParallelSize > 1): CpuModelRunner's and CudaModelRunner's `eplb` option.
   */
  eplb?: EplbPolicy;
  blockSize?: number;
  layout?: KvLayout;
  /** Blocks in the KV pool; default from kvCacheBytes. */
  numBlocks?: number;
  /** Bytes of KV pool; default DEFAULT_KV_MEMORY_FRACTION of free memory, at most DEFAULT_MAX_KV_BYTES. */
  kvCacheBytes?: number;
  /** CPU engine: memory for the KV pool (e.g. a transfer agent's shared region, so that peers can reach it). */
  kvBuffer?: Uint8Array;
  /** CPU engine: or called with the pool's description once its size is known, returns its memory. */
  kvBufferFor?: (spec: KvPoolSpec) => Uint8Array;
  engine?: LlmEngineOptions;
  /** Called as weights load: tensors done, tensors in all. */
  onProgress?: (loaded: number, total: number, name: string) => void;
  /**
   * Start-up log: the time of each phase (config and tokenizer, device, kernels, KV pool, weights, engine) and
   * throttled progress through the weights. A worker writes these lines to stderr.
   */
  log?: StartLog;
}

export interface OpenedModel {
  readonly model: string;
  readonly config: ModelConfig;
  readonly tokenizer: TextTokenizer;
  readonly runner: CpuModelRunner | CudaModelRunner;
  readonly engine: LlmEngine;
  readonly device: 'cpu' | 'cuda';
  /** The tensor / pipeline parallel layout, and in words ("tp 2 x pp 1 (2 ranks; ...)"). */
  readonly parallel: ParallelConfig;
  readonly layout: string;
  /** Why 'auto' chose the CPU on a machine with a GPU (the GPU engine's error), when it did. */
  readonly fallbackReason?: string;
  /**
   * The KV pool as lib/kv describes it. Register its memory with a transfer agent to move blocks: the CPU
   * runner's `kvBuffer` (host), the GPU runner's `kvDeviceBuffer` (device).
   */
  readonly kvPoolSpec: KvPoolSpec;
  /**
   * The KV pool of each rank that keeps its own, rank 0 first: one for the CPU engine (its ranks share one pool of
   * every head, kvPoolSpec) and for one GPU rank; tp for the GPU engine's tensor-parallel ranks (rank r's kv heads,
   * in the runner's `kvDeviceBuffers[r]`); tp x pp, stage-major, for its pipeline stages (each its stage's layers:
   * layerStart, layers). What kvRankTransferPieces maps between two engines.
   */
  readonly kvRankPoolSpecs: readonly KvPoolSpec[];
  dispose(): Promise<void>;
  [Symbol.asyncDispose](): Promise<void>;
}

function countingWeights(
  source: string,
  config: ModelConfig,
  seed: number | undefined,
  onProgress: OpenModelOptions['onProgress'],
): Iterable<NamedTensor> {
  const total = expectedTensors(config).length;
  return {
    *[Symbol.iterator]() {
      let loaded = 0;
      for (const t of loadWeights(source, { config, ...(seed !== undefined ? { seed } : {}) })) {
        yield t;
        onProgress?.(++loaded, total, t.name);
      }
    },
  };
}

/**
 * The MoE layouts the GPU engine does not run, as a ParallelLayoutError saying what to do instead: tensor parallelism
 * of the experts' channels (tp > 1 with ep 1; the GPU ranks split whole experts, ep = tp) and a shared expert or
 * dense layers (Qwen2-MoE) on several ranks.
 */
function checkGpuExpertLayout(model: string, config: ModelConfig, parallel: ParallelConfig): void {
  if (!config.moe) return;
  if (parallel.tp > 1 && parallel.ep === 1)
    throw new ParallelLayoutError(
      `${model}: ${describeParallel(config, parallel)} is not on the GPU engine: its ranks split a mixture-of-experts ` +
        `model's experts (expertParallelSize = tensorParallelSize, --ep ${parallel.tp}); tensor parallelism of the ` +
        `experts' channels runs on CPU ranks (--device cpu)`,
    );
}

/** What a GPU runner runs: its group of ranks as tensor-parallel (dense) or expert-parallel (MoE, tp 1 or = ep). */
function gpuRunningLayout(runner: CudaModelRunner): ParallelConfig {
  const ep = runner.expertParallelSize;
  const group = runner.tensorParallelSize;
  const tp = ep > 1 && runner.tensorShards[0]?.size === 1 ? 1 : group;
  return { ...SINGLE_RANK, tp, ep, pp: runner.pipelineParallelSize };
}

/** Loads a model and starts an engine on it. Throws ModelConfigError / CheckpointError naming the file. */
export async function openModel(options: OpenModelOptions): Promise<OpenedModel> {
  const { model } = options;
  if (typeof model !== 'string' || model.length === 0) throw new BadArgumentError('openModel: model is required');
  const device = options.device ?? 'auto';
  if (device !== 'cpu' && device !== 'cuda' && device !== 'auto')
    throw new BadArgumentError(`device must be cpu, cuda or auto (got ${String(device)})`);
  const phases = new StartPhases(options.log);
  const { config, tokenizer } = await phases.run('config and tokenizer', () => {
    const config = isDummyModel(model) ? dummyConfig(model) : loadModelConfig(model);
    return { config, tokenizer: modelTokenizer(model, config) };
  });
  // The layout is checked against the model before any memory is taken.
  const parallel = checkParallelConfig(
    config,
    { tp: options.tensorParallelSize ?? 1, pp: options.pipelineParallelSize ?? 1, ep: options.expertParallelSize ?? 1 },
    model,
  );
  const ranks = rankCount(parallel);
  // Checked here too: a single-rank model could otherwise open on a GPU and run without the balancing asked for.
  if (options.eplb !== undefined && (!config.moe || parallel.ep < 2))
    throw new BadArgumentError(`${model}: eplb needs a mixture-of-experts model with expert parallelism (ep > 1)`);
  const blockSize = options.blockSize ?? 16;
  const layout = options.layout ?? 'block-major';
  const blockBytes = kvPool({
    layers: config.numLayers,
    kvHeads: config.numKvHeads,
    headDim: config.headDim,
    blockSize,
    numBlocks: 1,
    dtype: 'fp32',
    layout,
  }).blockBytes;
  const blocksPerSequence = Math.ceil(config.maxPositionEmbeddings / blockSize);
  let numBlocks = options.numBlocks;
  if (numBlocks === undefined) {
    const bytes = options.kvCacheBytes ?? Math.min(freemem() * DEFAULT_KV_MEMORY_FRACTION, DEFAULT_MAX_KV_BYTES);
    // No more than DEFAULT_POOL_SEQUENCES full-length sequences need (a small model would otherwise take
    // gigabytes it never uses); at least one full-length sequence, where memory allows.
    numBlocks = Math.min(Math.floor(bytes / blockBytes), DEFAULT_POOL_SEQUENCES * blocksPerSequence);
    numBlocks = Math.max(numBlocks, Math.min(blocksPerSequence + 1, 64));
  }
  const spec: KvPoolSpec = {
    layers: config.numLayers,
    kvHeads: config.numKvHeads,
    headDim: config.headDim,
    blockSize,
    numBlocks,
    dtype: 'fp32',
    layout,
    headLayout: 'NHD',
  };
  let runner: CpuModelRunner | CudaModelRunner | undefined;
  let fallbackReason: string | undefined;
  if (device !== 'cpu') {
    const deviceCount = device === 'auto' ? (await probeCuda()).deviceCount : 1;
    if (deviceCount > 0 && ranks > 1) {
      if (parallel.pp > 1 && parallel.ep > 1)
        throw new ParallelLayoutError(
          `${model}: ${describeParallel(config, parallel)} is not on the GPU engine, which runs expert-parallel ` +
            `ranks in one pipeline stage; run pipeline and expert parallelism together on CPU ranks with device 'cpu' (--device cpu)`,
        );
      checkGpuExpertLayout(model, config, parallel);
      // Checked here, before any GPU memory is taken (CudaModelRunner.create checks again).
      checkCudaTensorParallel(config, parallel.tp, model);
      checkCudaExpertParallel(config, parallel.tp, parallel.ep, model);
      if (parallel.pp > 1) checkCudaPipeline(config, parallel.tp, parallel.pp, model);
      tpPlacement(rankCount(parallel), options.gpu ?? 0, options.gpus, undefined, model);
    }
    if (deviceCount > 0) {
      try {
        const fraction = options.kvCacheFraction ?? DEFAULT_GPU_KV_FRACTION;
        if (!(fraction > 0 && fraction <= 1))
          throw new BadArgumentError(`kvCacheFraction must be in (0, 1] (got ${String(options.kvCacheFraction)})`);
        runner = await CudaModelRunner.create({
          config,
          device: options.gpu ?? 0,
          ...(ranks > 1 ? { parallel: { tp: parallel.tp, pp: parallel.pp, ep: parallel.ep } } : {}),
          ...(ranks > 1 && options.gpus ? { devices: options.gpus } : {}),
          ...(options.eplb !== undefined ? { eplb: options.eplb } : {}),
          blockSize,
          layout,
          ...(options.numBlocks !== undefined ? { numBlocks: options.numBlocks } : {}),
          ...(options.kvCacheBytes !== undefined ? { kvCacheBytes: options.kvCacheBytes } : {}),
          ...(options.numBlocks === undefined && options.kvCacheBytes === undefined
            ? { kvCacheFraction: fraction, maxDefaultBlocks: DEFAULT_POOL_SEQUENCES * blocksPerSequence }
            : {}),
          weights: model,
          ...(options.seed !== undefined ? { seed: options.seed } : {}),
          ...(options.onProgress ? { onProgress: options.onProgress } : {}),
          ...(options.log ? { log: options.log } : {}),
        });
      } catch (error) {
        if (device === 'cuda' || !(error instanceof BackendUnavailableError)) throw error;
        fallbackReason = error.message;
      }
    }
  }
  if (!runner) {
    const kvBuffer = options.kvBuffer ?? options.kvBufferFor?.(spec);
    runner = await phases.run('CPU model runner and weights', () =>
      CpuModelRunner.create({
        config,
        numBlocks,
        blockSize,
        layout,
        ...(kvBuffer ? { kvBuffer } : {}),
        ...(options.threads !== undefined ? { threads: options.threads } : {}),
        parallel,
        ...(options.eplb !== undefined ? { eplb: options.eplb } : {}),
        weights: countingWeights(model, config, options.seed, options.onProgress),
      }),
    );
  }
  const engine = new LlmEngine(runner, {
    detokenize: (ids) => tokenizer.decode(ids),
    ...options.engine,
  });
  // What the runner runs, not what was asked.
  const running: ParallelConfig = runner instanceof CpuModelRunner ? runner.parallel : gpuRunningLayout(runner);
  const layoutText = describeParallel(config, running);
  options.log?.(
    `model ${model} open on ${runner instanceof CudaModelRunner ? 'cuda' : 'cpu'}` +
      `${rankCount(running) > 1 ? ` as ${layoutText}` : ''} in ${phases.elapsedMs().toFixed(0)} ms`,
  );
  let disposed = false;
  const dispose = async () => {
    if (disposed) return;
    disposed = true;
    await engine.dispose(); // disposes the runner too (it owns it)
  };
  return {
    model,
    config,
    tokenizer,
    runner,
    engine,
    device: runner instanceof CudaModelRunner ? 'cuda' : 'cpu',
    parallel: { ...running },
    layout: layoutText,
    ...(fallbackReason ? { fallbackReason } : {}),
    kvPoolSpec: runner.kvPoolSpec,
    kvRankPoolSpecs: runner instanceof CudaModelRunner ? runner.kvRankPoolSpecs : [runner.kvPoolSpec],
    dispose,
    [Symbol.asyncDispose]: dispose,
  };
}

/**
 * The reference engine's CPU model runner: a Llama-family model (Llama 2/3.x with llama3 RoPE scaling, Qwen2
 * with q/k/v bias, Mistral's sliding window; tied or untied embeddings; GQA; mixture-of-experts Mixtral and
 * Qwen3-MoE) in fp32 on native threads
 * (native/src/engine/). It implements `ModelRunner` (lib/engine/runner.ts) over a paged fp32 KV pool in the
 * caller's memory, laid out as lib/kv describes, so that a worker can register the same bytes with the
 * transfer agent and move blocks to or from another engine.
 *
 *   const runner = await CpuModelRunner.create({ config, numBlocks: 256, weights: loadWeights('dummy:tiny') });
 *   const logits = await runner.forward(batch);   // nseq x vocabSize
 *   await runner.dispose();                       // joins the threads
 */
import { BadArgumentError, native, nativeSync } from '../errors.js';
import { checkInteger, kvPool, type KvLayout, type KvPool, type KvPoolSpec } from '../kv/pool.js';
import { loadBinding, type RawCollectiveTime, type RawCpuLlama } from '../native/binding.js';
import { loadModelConfig, type ModelConfig } from './model/config.js';
import { dummyConfig, dummyWeights, isDummyModel } from './model/dummy.js';
import {
  checkCheckpointTensors,
  nativeManifest,
  tensorElements,
  weightManifest,
  type ManifestTensor,
} from './model/manifest.js';
import { openSafetensors } from './model/safetensors.js';
import {
  checkParallelConfig,
  describeParallel,
  groupSize,
  rankCount,
  rankSlice,
  tensorStages,
  type ParallelConfig,
} from './parallel.js';
import { forwardArgs, type ForwardBatch, type ModelRunner } from './runner.js';
import { layerPlacementFromSlots, type ExpertPlacement } from '../moe/eplb.js';
import { checkEplbPolicy, ExpertBalancer, type EplbDecision, type EplbPolicy } from '../moe/policy.js';

/** One weight tensor by its Hugging Face name, as float32 values in the checkpoint's row-major order. */
export interface NamedTensor {
  name: string;
  data: Float32Array;
}

/** Where weights come from: tensors as they are produced, or a function that starts producing them. */
export type WeightSource =
  Iterable<NamedTensor> | AsyncIterable<NamedTensor> | (() => Iterable<NamedTensor> | AsyncIterable<NamedTensor>);

/** Seed of `dummy:` weights when none is given. */
export const DEFAULT_DUMMY_SEED = 0;

export interface LoadWeightsOptions {
  /** The model's config; default: `dummyConfig(source)` for `dummy:` names, else `<source>/config.json`. */
  config?: ModelConfig;
  /** Seed of dummy weights (default DEFAULT_DUMMY_SEED). */
  seed?: number;
}

/**
 * The tensors a model of `config` needs, in checkpoint order, one at a time: from a safetensors checkpoint
 * (directory, file or index; BF16/F16/F32 converted to float32) or, for `dummy:<preset>`, seeded dummy weights.
 * The checkpoint is checked against the weight manifest first (model/manifest.ts): a tensor missing, of the
 * wrong shape, or not in the manifest throws CheckpointError naming it before any loads; a tied model's
 * lm_head.weight is skipped.
 */
export function* loadWeights(source: string, options: LoadWeightsOptions = {}): Generator<NamedTensor> {
  if (isDummyModel(source)) {
    const config = options.config ?? dummyConfig(source);
    for (const t of dummyWeights(config, options.seed ?? DEFAULT_DUMMY_SEED)) yield { name: t.name, data: t.data };
    return;
  }
  const config = options.config ?? loadModelConfig(source);
  const checkpoint = openSafetensors(source);
  try {
    const manifest = weightManifest(config);
    checkCheckpointTensors(manifest, checkpoint, source);
    for (const spec of manifest) yield { name: spec.name, data: checkpoint.tensorF32(spec.name) };
  } finally {
    checkpoint.close();
  }
}

/** The model fields of the native runners' options (CpuLlama, CudaLlama). */
export function nativeModelFields(config: ModelConfig) {
  return {
    vocabSize: config.vocabSize,
    hiddenSize: config.hiddenSize,
    intermediateSize: config.intermediateSize,
    numLayers: config.numLayers,
    numHeads: config.numHeads,
    numKvHeads: config.numKvHeads,
    headDim: config.headDim,
    rmsNormEps: config.rmsNormEps,
    ropeTheta: config.ropeTheta,
    ropeScaling: config.ropeScaling,
    maxPositionEmbeddings: config.maxPositionEmbeddings,
    tieWordEmbeddings: config.tieWordEmbeddings,
    attentionBias: config.attentionBias,
    attentionOutputBias: config.attentionOutputBias,
    slidingWindow: config.slidingWindow || null,
    qkNorm: config.qkNorm ?? false,
    moe: config.moe ?? null,
    tensors: nativeManifest(weightManifest(config)),
  };
}

/** Matrix kernels of the native runner; 'auto' picks the best this CPU runs. */
export type CpuKernel = 'auto' | 'avx512' | 'avx2' | 'generic';

export interface CpuModelRunnerOptions {
  config: ModelConfig;
  /** Blocks in the KV pool. */
  numBlocks: number;
  /** Tokens per block. Default 16. */
  blockSize?: number;
  /** KV pool layout (lib/kv). Default 'block-major'. */
  layout?: KvLayout;
  /**
   * fp32 KV pool memory of at least `kvPoolSpec`'s poolBytes (e.g. a transfer agent's shared region), starting
   * at a multiple of 4 bytes. Allocated when absent. The runner keeps a reference while it lives.
   */
  kvBuffer?: Uint8Array;
  /** Compute threads, the forward thread included. Default min(hardware threads, 8). */
  threads?: number;
  /** For tests and benchmarks: force a matrix kernel. Default 'auto'. */
  kernel?: CpuKernel;
  /** The weights, or a checkpoint directory / `dummy:<preset>` name for `loadWeights`. */
  weights: WeightSource | string;
  /** Seed of `dummy:` weights when `weights` is a name. */
  seed?: number;
  /**
   * Tensor, pipeline and expert parallel layout (lib/engine/parallel.ts): max(tp, ep) x pp ranks, each a native
   * thread holding its slice of the weights, with `threads` split between them. Default { tp: 1, pp: 1, ep: 1 }.
   * A layout that does not fit the model throws ParallelLayoutError before any memory is taken.
   */
  parallel?: Partial<ParallelConfig>;
  /**
   * Online expert load balancing (EPLB, lib/moe) of an expert-parallel MoE model (ep > 1): every rank gets
   * `redundantSlotsPerRank` extra expert slots (replicas, placed first as lib/moe's staticPlacement has them), and
   * the runner feeds each pass's expert load to an ExpertBalancer; when it decides on a new placement (every
   * `periodSteps` passes once `windowSteps` are in its window, if the imbalance drops by `minImbalanceGain`), the
   * runner applies it before its pass resolves (applyExpertPlacement). numNodes / numExpertGroups: hierarchical.
   */
  eplb?: EplbPolicy;
}

/** What applying an expert placement took: slots rewritten, the copies that came from another rank, bytes copied. */
export interface ExpertPlacementChange {
  slotsCopied: number;
  crossRankCopies: number;
  bytes: number;
}

const LAYOUTS: readonly KvLayout[] = ['block-major', 'layer-major'];

/** A runner's config and layout options, checked (shared by the CPU and GPU runners). */
export function runnerConfigAndLayout(
  where: string,
  options: { config: ModelConfig; layout?: KvLayout },
): { config: ModelConfig; layout: KvLayout } {
  const { config } = options;
  if (typeof config !== 'object' || config === null) throw new BadArgumentError(`${where}: config is required`);
  const layout = options.layout ?? 'block-major';
  if (!LAYOUTS.includes(layout))
    throw new BadArgumentError(`${where}: layout must be one of ${LAYOUTS.join(', ')} (got ${String(layout)})`);
  return { config, layout };
}

/** The KvPoolSpec of a runner's pool (NHD tiles in the pool's dtype). */
export function runnerPoolSpec(pool: KvPool, dtype: KvPoolSpec['dtype']): KvPoolSpec {
  return {
    layers: pool.layers,
    kvHeads: pool.kvHeads,
    headDim: pool.headDim,
    blockSize: pool.blockSize,
    numBlocks: pool.numBlocks,
    dtype,
    layout: pool.layout,
    headLayout: 'NHD',
  };
}
const KERNELS: readonly CpuKernel[] = ['auto', 'avx512', 'avx2', 'generic'];

/**
 * Copies a whole tensor into every rank that holds it, each rank its slice by the tensor's shard rule. A single
 * rank, or a name the manifest does not know, goes to the native runner as is (which names what is wrong).
 */
function setRankSlices(
  raw: RawCpuLlama,
  config: ModelConfig,
  parallel: ParallelConfig,
  spec: ManifestTensor | undefined,
  tensor: NamedTensor,
): void {
  if (spec === undefined || rankCount(parallel) === 1) {
    nativeSync(() => raw.setWeight(tensor.name, tensor.data));
    return;
  }
  const need = tensorElements(spec);
  if (!(tensor.data instanceof Float32Array) || tensor.data.length !== need)
    throw new BadArgumentError(
      `tensor '${tensor.name}' has ${tensor.data?.length} elements; this config needs ${need} (shape [${spec.shape.join(', ')}])`,
    );
  const group = groupSize(parallel);
  for (const stage of tensorStages(config, parallel.pp, spec))
    for (let r = 0; r < group; r++) {
      const slice = rankSlice(config, parallel, r, spec, tensor.data);
      if (slice) nativeSync(() => raw.setWeight(tensor.name, slice, stage * group + r));
    }
}

export class CpuModelRunner implements ModelRunner {
  readonly vocabSize: number;
  readonly blockSize: number;
  readonly numBlocks: number;
  readonly maxPositions: number;
  /** The KV pool as lib/kv describes it (fp32, NHD), for registering `kvBuffer` with a transfer agent. */
  readonly kvPoolSpec: KvPoolSpec;
  /** The checked pool, with its tile, block and pool sizes. */
  readonly kvPool: KvPool;
  /** With `eplb`: the last automatic placement change that failed (the runner kept its placement, serving on). */
  eplbError?: Error;
  /** With `eplb`: loads not yet taken by takeExpertLoad (the balancer reads the native counts after each pass). */
  private untakenLoad?: Float64Array;

  private constructor(
    private readonly raw: RawCpuLlama,
    readonly config: ModelConfig,
    pool: KvPool,
    /** The KV pool's memory. */
    readonly kvBuffer: Uint8Array,
    /** The tensor / pipeline parallel layout. */
    readonly parallel: ParallelConfig,
    /** With the `eplb` option: the balancer the runner feeds and follows (its decisions, window, placement). */
    readonly expertBalancer?: ExpertBalancer,
  ) {
    this.vocabSize = config.vocabSize;
    this.blockSize = pool.blockSize;
    this.numBlocks = pool.numBlocks;
    this.maxPositions = config.maxPositionEmbeddings;
    this.kvPool = pool;
    this.kvPoolSpec = runnerPoolSpec(pool, 'fp32');
  }

  /** Builds the model, copies every weight in, and checks that none is missing. */
  static async create(options: CpuModelRunnerOptions): Promise<CpuModelRunner> {
    const where = 'CpuModelRunner.create';
    const { config, layout } = runnerConfigAndLayout(where, options);
    const kernel = options.kernel ?? 'auto';
    if (!KERNELS.includes(kernel))
      throw new BadArgumentError(`${where}: kernel must be one of ${KERNELS.join(', ')} (got ${String(kernel)})`);
    if (options.threads !== undefined) checkInteger(where, 'threads', options.threads, 1);
    const parallel = checkParallelConfig(config, options.parallel, where);
    let balancer: ExpertBalancer | undefined;
    if (options.eplb !== undefined) {
      const policy = checkEplbPolicy({ ...options.eplb });
      if (!config.moe || parallel.ep < 2)
        throw new BadArgumentError(`${where}: eplb needs a mixture-of-experts model with expert parallelism (ep > 1)`);
      if (policy.redundantSlotsPerRank > config.moe.numExperts)
        throw new BadArgumentError(
          `${where}: eplb.redundantSlotsPerRank is at most the model's ${config.moe.numExperts} experts (got ${policy.redundantSlotsPerRank})`,
        );
      balancer = new ExpertBalancer(config.numLayers, config.moe.numExperts, parallel.ep, policy);
    }
    const pool = kvPool({
      layers: config.numLayers,
      kvHeads: config.numKvHeads,
      headDim: config.headDim,
      blockSize: options.blockSize ?? 16,
      numBlocks: options.numBlocks,
      dtype: 'fp32',
      layout,
      headLayout: 'NHD',
    });
    let kvBuffer = options.kvBuffer;
    if (kvBuffer === undefined) kvBuffer = new Uint8Array(pool.poolBytes);
    else if (!(kvBuffer instanceof Uint8Array)) throw new BadArgumentError(`${where}: kvBuffer must be a Uint8Array`);
    else if (kvBuffer.byteLength < pool.poolBytes)
      throw new BadArgumentError(
        `${where}: kvBuffer holds ${kvBuffer.byteLength} bytes; the pool needs ${pool.poolBytes} ` +
          `(${pool.numBlocks} blocks x ${pool.blockBytes} bytes)`,
      );
    else if (kvBuffer.byteOffset % 4 !== 0)
      throw new BadArgumentError(
        `${where}: kvBuffer must start at a multiple of 4 bytes (byteOffset ${kvBuffer.byteOffset})`,
      );

    const { binding } = loadBinding();
    const buffer = kvBuffer;
    const raw = nativeSync(
      () =>
        new binding.CpuLlama({
          ...nativeModelFields(config),
          numBlocks: pool.numBlocks,
          blockSize: pool.blockSize,
          layout,
          kvBuffer: buffer,
          ...(options.threads !== undefined ? { threads: options.threads } : {}),
          kernel,
          tensorParallelSize: parallel.tp,
          pipelineParallelSize: parallel.pp,
          expertParallelSize: parallel.ep,
          redundantExpertSlots: balancer?.policy.redundantSlotsPerRank ?? 0,
        }),
    );
    try {
      let source = options.weights;
      if (typeof source === 'string')
        source = loadWeights(source, { config, seed: options.seed ?? DEFAULT_DUMMY_SEED });
      else if (typeof source === 'function') source = source();
      const manifest = new Map(weightManifest(config).map((t) => [t.name, t]));
      for await (const tensor of source as AsyncIterable<NamedTensor> | Iterable<NamedTensor>)
        setRankSlices(raw, config, parallel, manifest.get(tensor.name), tensor);
      nativeSync(() => raw.ready());
    } catch (error) {
      await raw.dispose();
      throw error;
    }
    return new CpuModelRunner(raw, config, pool, buffer, parallel, balancer);
  }

  /** The layout in words ("single rank (tp 1, pp 1)", "tp 2 x pp 2 (4 ranks; ...)"), for logs and `tandem info`. */
  get layout(): string {
    return describeParallel(this.config, this.parallel);
  }

  /** Compute threads of all ranks (each rank's own thread included). */
  get threads(): number {
    return this.raw.threads;
  }
  /** The matrix kernel in use: 'avx512', 'avx2' or 'generic'. */
  get kernel(): string {
    return this.raw.kernel;
  }
  get disposed(): boolean {
    return this.raw.disposed;
  }

  /**
   * Runs one step (see ForwardBatch) on the runner's own thread; passes run one at a time, in call order.
   * Every index is checked before anything is written: a malformed batch rejects with BadArgumentError and
   * leaves the KV pool as it was.
   */
  async forward(batch: ForwardBatch): Promise<Float32Array> {
    const logits = await native(() => this.raw.forward(...forwardArgs(batch)));
    if (this.expertBalancer) await this.balanceStep(this.expertBalancer);
    return logits;
  }

  /**
   * One pass's expert load into the balancer; a placement it decides on is applied before the pass resolves (so the
   * next pass routes through it). A failed apply leaves the runner on the placement it holds, and the balancer too.
   */
  private async balanceStep(balancer: ExpertBalancer): Promise<void> {
    const load = nativeSync(() => this.raw.takeExpertLoad());
    if (this.untakenLoad) for (let i = 0; i < load.length; i++) this.untakenLoad[i] = this.untakenLoad[i]! + load[i]!;
    else this.untakenLoad = load.slice();
    const decision: EplbDecision | undefined = balancer.step(load);
    if (!decision?.applied) return;
    try {
      await this.applyExpertPlacement(decision.result.placement);
    } catch (error) {
      this.eplbError = error as Error;
      if (!this.raw.disposed) balancer.adopt(this.expertPlacement);
    }
  }

  /**
   * Mixture-of-experts models: the tokens routed to each expert by the passes completed since the last call,
   * flat and layer-major (numLayers x numExperts), and a reset; what lib/moe's ExpertLoadWindow records per step.
   * Empty for a dense model.
   */
  takeExpertLoad(): Float64Array {
    const load = nativeSync(() => this.raw.takeExpertLoad());
    const untaken = this.untakenLoad;
    this.untakenLoad = undefined;
    if (untaken) for (let i = 0; i < load.length; i++) load[i] = load[i]! + untaken[i]!;
    return load;
  }

  /**
   * Mixture-of-experts models: the (token, choice) pairs each expert-parallel rank's expert slots ran per layer by
   * the passes since the last call, flat and layer-major (numLayers x ep; x 1 without expert parallelism), and a
   * reset: the runner's own per-rank load, whose max / mean is the imbalance EPLB lowers.
   */
  takeRankLoad(): Float64Array {
    return nativeSync(() => this.raw.takeRankLoad());
  }

  /** The expert placement in force (lib/moe's ExpertPlacement): ep ranks x slotsPerRank slots per layer. */
  get expertPlacement(): ExpertPlacement {
    const { ranks, slotsPerRank, slotExpert } = nativeSync(() => this.raw.expertPlacement());
    const numExperts = this.config.moe!.numExperts;
    const perLayer = ranks * slotsPerRank;
    const layers = Array.from({ length: this.config.numLayers }, (_, l) =>
      layerPlacementFromSlots(slotExpert.slice(l * perLayer, (l + 1) * perLayer), numExperts),
    );
    return { numExperts, numRanks: ranks, slotsPerRank, layers };
  }

  /**
   * Applies an expert placement (lib/moe's balancer output) online: after the passes already called (one in
   * progress finishes on the old placement), every slot whose expert changes gets that expert's weights from a slot
   * holding it (its own rank's when it has one; the ranks are threads of this process, so the copy is a memcpy),
   * then the routing table switches; passes called after this route through the new one. Results do not change:
   * replicas are copies and the combine sums in expert order. A placement of the wrong shape, an expert out of range
   * or without a replica, or a model without expert parallelism throws BadArgumentError and changes nothing.
   */
  async applyExpertPlacement(placement: ExpertPlacement): Promise<ExpertPlacementChange> {
    const where = 'CpuModelRunner.applyExpertPlacement';
    const moe = this.config.moe;
    if (!moe || this.parallel.ep < 2)
      throw new BadArgumentError(`${where}: needs a mixture-of-experts model with expert parallelism (ep > 1)`);
    const slotsPerRank = moe.numExperts / this.parallel.ep + (this.expertBalancer?.policy.redundantSlotsPerRank ?? 0);
    if (
      typeof placement !== 'object' ||
      placement === null ||
      placement.numRanks !== this.parallel.ep ||
      placement.slotsPerRank !== slotsPerRank ||
      placement.numExperts !== moe.numExperts ||
      !Array.isArray(placement.layers) ||
      placement.layers.length !== this.config.numLayers
    )
      throw new BadArgumentError(
        `${where}: the runner has ${this.config.numLayers} layers x ${moe.numExperts} experts on ${this.parallel.ep} ` +
          `ranks x ${slotsPerRank} slots; the placement is ${placement?.layers?.length} x ${placement?.numExperts} on ` +
          `${placement?.numRanks} x ${placement?.slotsPerRank}`,
      );
    const perLayer = this.parallel.ep * slotsPerRank;
    const table = new Int32Array(this.config.numLayers * perLayer);
    placement.layers.forEach((layer, l) => {
      if (layer?.slotToExpert?.length !== perLayer)
        throw new BadArgumentError(
          `${where}: layer ${l} has ${layer?.slotToExpert?.length} slots; the runner has ${perLayer}`,
        );
      table.set(layer.slotToExpert, l * perLayer);
    });
    // Checked synchronously (a bad table throws here, nothing queued); applied on the pass thread.
    const change = await native(() => this.raw.applyExpertPlacement(table));
    this.expertBalancer?.adopt(this.expertPlacement);
    return change;
  }

  /**
   * Host time (ms) each rank (stage * max(tp, ep) + rank in the stage) spent in its collectives over the passes
   * since the last call, and a reset: all-reduces, the logits gather, barriers and, after stage 0, waiting for the
   * previous stage's activations. Each is the rank's wait for its peers plus its own summing and copying
   * (steady_clock around each call); zeros with a single rank. What bench:engine's "collective share" divides.
   */
  takeCollectiveTime(): RawCollectiveTime[] {
    return nativeSync(() => this.raw.takeCollectiveTime());
  }

  /** Stops (a pass in progress gives up at its next layer and rejects with DisposedError), joins the threads. */
  dispose(): Promise<void> {
    return native(() => this.raw.dispose());
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.dispose();
  }
}

/**
 * Pipeline parallelism of the GPU engine (issue 25): pp stages, each a group of tp CudaLlama ranks (one rank: no
 * tensor parallelism) holding a contiguous share of the layers (lib/engine/parallel.ts's stageLayers, the CPU
 * ranks' split), the embedding on the first stage, the final norm and lm_head on the last, and a KV pool of its
 * layers only (lib/kv's stage pool: layerStart, layers, modelLayers; and its kv heads, tpSize / tpRank).
 *
 * A step's batch is split into micro-batches of whole sequences, as many as there are stages (fewer with fewer
 * sequences), and stage s runs micro-batch m once stage s - 1 has handed it over and stage s has finished m - 1: a
 * decode step keeps every stage busy after the first micro-batch fills the pipeline. Each rank is its own CudaDevice
 * (thread and stream); the hand-off is the native stage channel (native/src/engine/cuda_llama_pp.h: on one GPU a
 * device-to-device copy ordered by events; NCCL send/recv between GPUs is not written yet), micro-batch m in slot m.
 * The last stage's rank 0 returns the logits (or the sampled rows) of its micro-batches, concatenated in order.
 *
 * Ranks are stage-major throughout: rank stage * tp + r is tensor-parallel rank r of stage `stage` (the CPU runner
 * group's order), in `kvRankPoolSpecs`, `kvDeviceBuffers` and the collective times.
 *
 *   const runner = await CudaModelRunner.create({ config, weights: 'dummy:tiny', parallel: { tp: 2, pp: 2 } });
 */
import { native, nativeSync, OutOfMemoryError, ParallelLayoutError } from '../errors.js';
import { CudaDevice, type DeviceBuffer } from '../cuda/index.js';
import { kvPool, type KvLayout, type KvPool, type KvPoolSpec } from '../kv/pool.js';
import {
  loadBinding,
  type RawCollectiveTime,
  type RawCudaLlama,
  type RawCudaStageChannel,
  type RawCudaTpGroup,
} from '../native/binding.js';
import { runnerPoolSpec } from './cpu.js';
import {
  DEFAULT_GPU_KV_FRACTION,
  GPU_ACTIVATION_RESERVE_BYTES,
  gpuWeightBytes,
  loadRankWeights,
  type CudaModelRunnerOptions,
} from './cuda.js';
import { checkCudaTensorParallel, cudaLlamaFields, MAX_LOCAL_TP_RANKS, tpPlacement } from './cuda-parallel.js';
import type { ModelConfig } from './model/config.js';
import { StartPhases } from './model/progress.js';
import { checkParallelConfig, stageLayers } from './parallel.js';
import { forwardArgs, type ForwardBatch, type SampledLogits, type SamplePlan } from './runner.js';

/** The most ranks (stages x tensor-parallel ranks) one GPU runs as a pipeline: each is a CudaDevice thread and stream. */
export const MAX_LOCAL_PIPELINE_RANKS = 16;

/**
 * Throws ParallelLayoutError unless tp x pp fits the model on the GPU engine: the layout fits (checkParallelConfig:
 * no more stages than layers, tp divides heads and channels), a dense model (no MoE pipeline on the GPU yet), tp at
 * most MAX_LOCAL_TP_RANKS and tp x pp at most MAX_LOCAL_PIPELINE_RANKS. Returns { tp, pp }.
 */
export function checkCudaPipeline(config: ModelConfig, tp: number, pp: unknown, where: string) {
  const checked = checkParallelConfig(config, { tp, pp: pp as number }, where);
  checkCudaTensorParallel(config, tp, where);
  if (checked.pp > 1 && config.moe)
    throw new ParallelLayoutError(
      `${where}: the GPU engine runs mixture-of-experts models in one pipeline stage; run pipeline parallelism of ` +
        `this model on CPU ranks (device 'cpu')`,
    );
  if (checked.tp * checked.pp > MAX_LOCAL_PIPELINE_RANKS)
    throw new ParallelLayoutError(
      `${where}: tp ${checked.tp} x pp ${checked.pp} is ${checked.tp * checked.pp} ranks; the GPU engine runs at most ` +
        `${MAX_LOCAL_PIPELINE_RANKS} on one GPU (tensor-parallel ranks at most ${MAX_LOCAL_TP_RANKS})`,
    );
  return { tp: checked.tp, pp: checked.pp };
}

/** Sequences [seqStart, seqStart + batch's) of a step, as their own batch. */
export interface MicroBatch {
  seqStart: number;
  batch: ForwardBatch;
}

/**
 * A batch split into at most `count` micro-batches of whole, consecutive sequences, as even in sequences as
 * possible (earlier ones taking the extra sequence); none for a batch of no sequences. Views of the batch's arrays
 * but seqStarts, which restarts at 0 in each.
 */
export function splitMicroBatches(batch: ForwardBatch, count: number): MicroBatch[] {
  const nseq = batch.seqStarts.length - 1;
  const parts = Math.min(count, nseq);
  const out: MicroBatch[] = [];
  const mb = batch.maxBlocksPerSeq;
  let a = 0;
  for (let m = 0; m < parts; m++) {
    const b = a + Math.floor(nseq / parts) + (m < nseq % parts ? 1 : 0);
    const t0 = batch.seqStarts[a]!;
    const t1 = batch.seqStarts[b]!;
    out.push({
      seqStart: a,
      batch: {
        tokens: batch.tokens.subarray(t0, t1),
        positions: batch.positions.subarray(t0, t1),
        seqStarts: batch.seqStarts.slice(a, b + 1).map((t) => t - t0),
        blockTables: batch.blockTables.subarray(a * mb, b * mb),
        maxBlocksPerSeq: mb,
        contextLens: batch.contextLens.subarray(a, b),
      },
    });
    a = b;
  }
  return out;
}

/** The rows [a, b) of a sampling plan. */
function planRows(plan: SamplePlan, a: number, b: number): SamplePlan {
  return {
    n: plan.n.subarray(a, b),
    flags: plan.flags.subarray(a, b),
    invT: plan.invT.subarray(a, b),
    topP: plan.topP.subarray(a, b),
    u: plan.u.subarray(a, b),
  };
}

/**
 * The sampled rows of consecutive micro-batches as one answer: rows in order, candidates padded to the widest part
 * (ids -1, logits -Infinity past a part's own), whole rows renumbered.
 */
export function mergeSampled(
  parts: readonly { seqStart: number; rows: SampledLogits }[],
  vocabSize: number,
): SampledLogits {
  const maxN = Math.max(1, ...parts.map((p) => p.rows.maxN));
  const nseq = parts.reduce((n, p) => n + p.rows.ints.length / 4, 0);
  const ints = new Int32Array(nseq * 4);
  const dbl = new Float64Array(nseq * 4);
  const topIds = new Int32Array(nseq * maxN).fill(-1);
  const topLogits = new Float32Array(nseq * maxN).fill(-Infinity);
  const fullRows: number[] = [];
  const full = new Float32Array(parts.reduce((n, p) => n + p.rows.full.length, 0));
  let fullAt = 0;
  for (const { seqStart, rows } of parts) {
    const n = rows.ints.length / 4;
    ints.set(rows.ints, seqStart * 4);
    dbl.set(rows.dbl, seqStart * 4);
    for (let r = 0; r < n; r++) {
      topIds.set(rows.topIds.subarray(r * rows.maxN, (r + 1) * rows.maxN), (seqStart + r) * maxN);
      topLogits.set(rows.topLogits.subarray(r * rows.maxN, (r + 1) * rows.maxN), (seqStart + r) * maxN);
    }
    for (const row of rows.fullRows) fullRows.push(seqStart + row);
    full.set(rows.full, fullAt);
    fullAt += rows.full.length;
  }
  return { vocabSize, maxN, ints, dbl, topIds, topLogits, fullRows: Int32Array.from(fullRows), full };
}

/** One rank of a pipeline: its model, device and KV pool. */
export interface PipelineRank {
  raw: RawCudaLlama;
  device: CudaDevice;
  kvBuffer: DeviceBuffer;
  pool: KvPool;
  ownsDevice: boolean;
}

/** A stage rank's KvPoolSpec: bf16 NHD, its layers (layerStart, modelLayers) and kv heads (tpSize, tpRank). */
export function stagePoolSpec(pool: KvPool): KvPoolSpec {
  return {
    ...runnerPoolSpec(pool, 'bf16'),
    ...(pool.tpSize > 1 ? { tpSize: pool.tpSize, tpRank: pool.tpRank } : {}),
    ...(pool.layers !== pool.modelLayers ? { layerStart: pool.layerStart, modelLayers: pool.modelLayers } : {}),
  };
}

/** The stage ranks of a runner, their schedule and their hand-off times. Made by openCudaPipeline. */
export class CudaPipeline {
  /** Host time (ms) each stage waited for the previous stage's micro-batches since the last take. */
  private readonly handoverMs: number[];

  constructor(
    /** [stage][tensor-parallel rank]. */
    readonly stages: readonly (readonly PipelineRank[])[],
  ) {
    this.handoverMs = stages.map(() => 0);
  }

  get pp(): number {
    return this.stages.length;
  }
  get tp(): number {
    return this.stages[0]!.length;
  }
  /** Every rank, stage-major. */
  get ranks(): PipelineRank[] {
    return this.stages.flat();
  }

  /**
   * One step: the micro-batches through the stages (see the file's doc comment), `lastPass` running each on the last
   * stage's rank 0 (its other ranks and every earlier stage's run forwardWithoutLogits). Settles once every pass
   * started has: with the micro-batches' results in order, or the first failure (a later stage never starts a
   * micro-batch whose earlier stage failed, and a failing rank stops its stage's collectives).
   */
  private async run<T>(
    batch: ForwardBatch,
    lastPass: (raw: RawCudaLlama, part: MicroBatch, slot: number) => Promise<T>,
  ): Promise<{ part: MicroBatch; result: T }[]> {
    // The whole step is checked first (the block tables across micro-batches too): a bad one writes no KV anywhere.
    nativeSync(() => this.stages[0]![0]!.raw.checkForward(...forwardArgs(batch)));
    const parts = splitMicroBatches(batch, this.pp);
    const started: Promise<unknown>[] = [];
    const stepStart = performance.now();
    let previous: Promise<number>[] = parts.map(() => Promise.resolve(stepStart)); // when stage s - 1 finished m
    let results: Promise<T>[] = [];
    this.stages.forEach((ranks, s) => {
      const last = s === this.pp - 1;
      let ownPrevious: Promise<number> = Promise.resolve(stepStart); // when this stage finished m - 1
      const done: Promise<number>[] = [];
      const stageResults: Promise<T>[] = [];
      parts.forEach((part, m) => {
        const ready = Promise.all([previous[m]!, ownPrevious]);
        const pass = ready.then(([handed, free]) => {
          if (s > 0) this.handoverMs[s]! += Math.max(0, handed - free);
          return this.stagePass(ranks, part, m, last ? lastPass : undefined);
        });
        started.push(pass);
        stageResults.push(pass as Promise<T>);
        const finished = pass.then(() => performance.now());
        finished.catch(() => {}); // the failure is `pass`'s, reported once by the step (the last one has no reader)
        done.push(finished);
        ownPrevious = finished;
      });
      previous = done;
      results = stageResults;
    });
    const settled = await Promise.allSettled(started);
    const failed = settled.find((r): r is PromiseRejectedResult => r.status === 'rejected');
    if (failed) throw failed.reason;
    return Promise.all(results.map(async (r, m) => ({ part: parts[m]!, result: await r })));
  }

  /** One micro-batch on one stage's ranks: rank 0's result (`lastPass`'s on the last stage), once all are done. */
  private async stagePass<T>(
    ranks: readonly PipelineRank[],
    part: MicroBatch,
    slot: number,
    lastPass: ((raw: RawCudaLlama, part: MicroBatch, slot: number) => Promise<T>) | undefined,
  ): Promise<T | undefined> {
    const args = forwardArgs(part.batch);
    const passes = ranks.map((rank, r) =>
      r === 0 && lastPass ? lastPass(rank.raw, part, slot) : native(() => rank.raw.forwardWithoutLogits(...args, slot)),
    );
    const settled = await Promise.allSettled(passes);
    const failed = settled.find((r): r is PromiseRejectedResult => r.status === 'rejected');
    if (failed) throw failed.reason;
    return lastPass ? (settled[0] as PromiseFulfilledResult<T>).value : undefined;
  }

  async forward(batch: ForwardBatch, vocabSize: number): Promise<Float32Array> {
    const parts = await this.run(batch, (raw, part, slot) =>
      native(() => raw.forward(...forwardArgs(part.batch), slot)),
    );
    const out = new Float32Array((batch.seqStarts.length - 1) * vocabSize);
    for (const { part, result } of parts) out.set(result, part.seqStart * vocabSize);
    return out;
  }

  async forwardSampled(batch: ForwardBatch, plan: SamplePlan, vocabSize: number): Promise<SampledLogits> {
    const parts = await this.run(batch, async (raw, part, slot) => {
      const rows = part.batch.seqStarts.length - 1;
      const sub = planRows(plan, part.seqStart, part.seqStart + rows);
      const r = await native(() => raw.forwardSampled(...forwardArgs(part.batch), sub, slot));
      return { vocabSize, ...r };
    });
    return mergeSampled(
      parts.map(({ part, result }) => ({ seqStart: part.seqStart, rows: result })),
      vocabSize,
    );
  }

  /**
   * Each rank's collective stream time since the last take (all-reduces and the logits gather of its stage's
   * tensor-parallel group) and its stage's wait for the previous one (handoverMs: host time from finishing its
   * previous micro-batch to the next one arriving), stage-major; then reset.
   */
  async takeCollectiveTime(): Promise<RawCollectiveTime[]> {
    const times = await Promise.all(this.ranks.map((rank) => native(() => rank.raw.takeCollectiveTime())));
    const handover = [...this.handoverMs];
    this.handoverMs.fill(0);
    return times.map((t, i) => ({
      allReduceMs: t.allReduceMs,
      gatherMs: t.gatherMs,
      barrierMs: 0,
      handoverMs: handover[Math.floor(i / this.tp)]!,
    }));
  }

  /** Frees every rank's model and pool, and closes the devices the pipeline opened. */
  async dispose(): Promise<void> {
    // Every rank at once: disposing one stops its stage's collectives, so no rank waits for a disposed one.
    await Promise.all(this.ranks.map((rank) => native(() => rank.raw.dispose())));
    for (const rank of this.ranks) {
      await rank.kvBuffer.dispose().catch(() => {});
      if (rank.ownsDevice) await rank.device.dispose();
    }
  }
}

/**
 * CudaModelRunner.create with pp > 1 stages (x tp ranks each): every rank's device opened, kernels loaded, KV pool of
 * its stage's layers allocated and model built before the weights (each rank generating or reading only its stage's
 * tensors, its slice of each); all of it disposed again on any failure.
 */
export async function openCudaPipeline(
  options: CudaModelRunnerOptions,
  config: ModelConfig,
  layout: KvLayout,
  blockSize: number,
  tp: number,
  pp: number,
): Promise<CudaPipeline> {
  const where = 'CudaModelRunner.create';
  const given = options.device ?? 0;
  const { ordinals, communicator } = tpPlacement(
    tp * pp,
    typeof given === 'number' ? given : given.ordinal,
    options.devices,
    options.communicator,
    where,
  );
  // The stage channel between GPUs (NCCL send/recv) is not written: every stage and rank on one GPU.
  if (communicator !== 'local')
    throw new ParallelLayoutError(
      `${where}: pipeline stages run on one GPU with the local communicator (the NCCL stage channel between GPUs is ` +
        `not written yet); got GPUs ${[...new Set(ordinals)].join(', ')} with communicator '${communicator}'`,
    );
  const phases = new StartPhases(options.log);
  const layers = stageLayers(config.numLayers, pp);
  interface Rank extends Partial<PipelineRank> {
    device: CudaDevice;
    ownsDevice: boolean;
    stage: number;
    tpRank: number;
  }
  const ranks: Rank[] = [];
  const poolOf = (stage: number, tpRank: number, numBlocks: number) =>
    kvPool({
      layers: layers[stage]!.count,
      layerStart: layers[stage]!.start,
      modelLayers: config.numLayers,
      kvHeads: config.numKvHeads,
      headDim: config.headDim,
      blockSize,
      numBlocks,
      dtype: 'bf16',
      layout,
      ...(tp > 1 ? { tpSize: tp, tpRank } : {}),
    });
  try {
    for (let i = 0; i < tp * pp; i++) {
      const stage = Math.floor(i / tp);
      const tpRank = i % tp;
      // The first rank may use the caller's device; every other one opens its own (its own thread and stream).
      const callers = i === 0 && typeof given !== 'number';
      const device = callers
        ? given
        : await phases.run(`open CUDA device ${ordinals[i]} (stage ${stage} rank ${tpRank})`, () =>
            CudaDevice.open(ordinals[i]!),
          );
      ranks.push({ device, ownsDevice: !callers, stage, tpRank });
      await phases.run(`load kernels (stage ${stage} rank ${tpRank})`, () => device.loadKernels());
    }
    let numBlocks = options.numBlocks;
    if (numBlocks === undefined) {
      // Every stage's pool has the same blocks (the engine's block ids name a block in each); one block's bytes over
      // all ranks are the whole model's layers and kv heads (more with replicated heads).
      const blockBytes = ranks.reduce((sum, r) => sum + poolOf(r.stage, r.tpRank, 1).blockBytes, 0);
      let bytes = options.kvCacheBytes;
      if (bytes === undefined) {
        const free = (await ranks[0]!.device.memoryInfo()).freeBytes;
        bytes =
          (free - gpuWeightBytes(config) - tp * pp * GPU_ACTIVATION_RESERVE_BYTES) *
          (options.kvCacheFraction ?? DEFAULT_GPU_KV_FRACTION);
      }
      numBlocks = Math.floor(bytes / blockBytes);
      if (options.maxDefaultBlocks !== undefined) numBlocks = Math.min(numBlocks, options.maxDefaultBlocks);
      if (numBlocks < 1) {
        const free = (await ranks[0]!.device.memoryInfo()).freeBytes;
        throw new OutOfMemoryError(
          `GPU ${ordinals[0]} has ${(free / 2 ** 30).toFixed(1)} GiB free; the weights of tp ${tp} x pp ${pp} ranks ` +
            `need ${(gpuWeightBytes(config) / 2 ** 30).toFixed(1)} GiB and leave no room for a KV pool`,
        );
      }
    }
    const binding = loadBinding().binding;
    const groups: (RawCudaTpGroup | undefined)[] = layers.map(() =>
      tp > 1 ? nativeSync(() => new binding.CudaTpGroup(tp)) : undefined,
    );
    // channels[s][r]: from rank r of stage s to rank r of stage s + 1.
    const channels: RawCudaStageChannel[][] = layers
      .slice(1)
      .map(() => Array.from({ length: tp }, () => nativeSync(() => new binding.CudaStageChannel())));
    for (const rank of ranks) {
      const { stage, tpRank } = rank;
      const pool = poolOf(stage, tpRank, numBlocks);
      rank.pool = pool;
      const buffer = await phases.run(
        `allocate KV pool of stage ${stage} rank ${tpRank} (${numBlocks} blocks, ${(pool.poolBytes / 1e9).toFixed(1)} GB)`,
        () => rank.device.alloc(pool.poolBytes),
      );
      rank.kvBuffer = buffer;
      rank.raw = nativeSync(
        () =>
          new binding.CudaLlama(rank.device.raw, {
            ...cudaLlamaFields(config, pool, layout, buffer, options.cudaGraphs),
            ...(tp > 1 ? { tp: { group: groups[stage]!, rank: tpRank } } : {}),
            pp: {
              stage,
              size: pp,
              layerStart: layers[stage]!.start,
              layerCount: layers[stage]!.count,
              ...(stage > 0 ? { input: channels[stage - 1]![tpRank]! } : {}),
              ...(stage < pp - 1 ? { output: channels[stage]![tpRank]! } : {}),
            },
          }),
      );
    }
    const models = ranks.map((rank) => rank.raw!);
    await phases.run('cuBLAS and weight memory', () => Promise.all(models.map((m) => native(() => m.init()))));
    // Each rank holds its stage's tensors (the embedding on the first stage, and on the last when lm_head is tied
    // to it; the final norm and lm_head on the last); each stage's rank 0 counts the checkpoint's progress.
    await loadRankWeights(
      ranks.map((r) => ({ model: r.raw!, tpSize: tp, tpRank: r.tpRank, countsProgress: r.tpRank === 0 })),
      config,
      options,
      where,
    );
    for (const m of models) nativeSync(() => m.ready());
    options.log?.(
      `GPU model runner (tp ${tp} x pp ${pp}: ${tp * pp} ranks) ready in ${phases.elapsedMs().toFixed(0)} ms`,
    );
    const done = ranks.map((r) => ({
      raw: r.raw!,
      device: r.device,
      kvBuffer: r.kvBuffer!,
      pool: r.pool!,
      ownsDevice: r.ownsDevice,
    }));
    return new CudaPipeline(layers.map((_, s) => done.slice(s * tp, (s + 1) * tp)));
  } catch (error) {
    await Promise.all(ranks.map((rank) => rank.raw?.dispose().catch(() => {})));
    for (const rank of ranks) {
      await rank.kvBuffer?.dispose().catch(() => {});
      if (rank.ownsDevice) await rank.device.dispose().catch(() => {});
    }
    throw error;
  }
}

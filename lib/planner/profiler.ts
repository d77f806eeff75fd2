/**
 * Measuring a profile (profile.ts) on this machine, through the engine that serves (lib/engine): for each parallel
 * layout asked for (`layouts`, default TP 1), one engine opened as a worker opens it (openModel with that layout's
 * tensor / pipeline / expert parallel sizes, default pool size and scheduler settings), measured, then closed
 * before the next opens. A layout the model does not allow (checkParallelConfig), or the device does not run, is
 * left out with its reason (`skippedLayouts`, and `onSkipLayout`).
 *
 * prefill(ISL): `prefillOnly` of one prompt of ISL tokens alone, as a prefill worker runs it (chunked by the
 *   scheduler's maxNumBatchedTokens, first token sampled); the median of `repeats` runs.
 * decode(batch, context): `batch` requests handed to `decodeFromBlocks` with `context` tokens of KV each, as a
 *   decode worker takes them after a KV transfer, decoding together; the median step time over `decodeSteps`
 *   steps, after WARMUP_STEPS steps not counted (the first step runs before the whole batch is in). The blocks
 *   are allocated and not computed: a step's cost does not depend on the values in the KV cache, and computing
 *   them would cost a prefill of batch x context tokens per point. A point whose sequences do not fit the KV
 *   pool (or the model's length) is left out of the profile: the planner reads it as unservable.
 * Prompts are seeded random token ids, distinct per run, so that the prefix cache never hits.
 */
import { capabilities } from '../capabilities/index.js';
import { BadArgumentError, ParallelLayoutError } from '../errors.js';
import { openModel, type OpenedModel } from '../engine/open.js';
import { rankCount, type ParallelConfig } from '../engine/parallel.js';
import { DEFAULT_MAX_NUM_BATCHED_TOKENS, DEFAULT_MAX_NUM_SEQS } from '../engine/scheduler.js';
import { seededSource } from '../bench/distributions.js';
import { median } from '../bench/stats.js';
import { packageVersion } from '../version.js';
import {
  PROFILE_FORMAT,
  PROFILE_VERSION,
  parseProfile,
  layoutName,
  type DecodePoint,
  type PrefillPoint,
  type Profile,
  type ProfileLayout,
  type SkippedLayout,
} from './profile.js';

/** Decode steps run before the timed ones (the batch fills in the first). */
export const WARMUP_STEPS = 2;

export interface ProfileSweep {
  isl: readonly number[];
  batch: readonly number[];
  context: readonly number[];
  repeats: number;
  decodeSteps: number;
}

/** The default sweep (a few minutes for a small model on a CPU; what a GPU profile wants). */
export const DEFAULT_SWEEP: ProfileSweep = {
  isl: [128, 256, 512, 1024, 2048, 4096],
  batch: [1, 2, 4, 8, 16, 32, 64],
  context: [256, 1024, 4096],
  repeats: 3,
  decodeSteps: 8,
};

/** --quick: seconds on a 2-core CPU with dummy:tiny. */
export const QUICK_SWEEP: ProfileSweep = {
  isl: [64, 256, 1024, 2048],
  batch: [1, 4, 16, 32],
  context: [128, 1024],
  repeats: 2,
  decodeSteps: 4,
};

export interface ProfileProgress {
  done: number;
  total: number;
  /** `prefill isl 512`, `decode batch 8 context 1024`. */
  point: string;
}

export interface MeasureProfileOptions {
  model: string;
  device?: 'cpu' | 'cuda' | 'auto';
  threads?: number;
  /** Seed of the prompts and of dummy weights. Default 0. */
  seed?: number;
  sweep?: Partial<ProfileSweep>;
  quick?: boolean;
  onProgress?: (progress: ProfileProgress) => void;
  /** Called with why a point was left out. */
  onSkip?: (point: string, why: string) => void;
  /** The parallel layouts to measure (missing sizes are 1). Default: TP 1 alone. */
  layouts?: readonly Partial<ParallelConfig>[];
  /** Called with a layout left out (`tp2pp2`) and why. */
  onSkipLayout?: (layout: string, why: string) => void;
}

/** Every combination of the sizes listed (`--tp 1,2 --pp 1,2`: tp1, tp1pp2, tp2, tp2pp2), in that order. */
export function layoutGrid(sizes: { tp?: readonly number[]; pp?: readonly number[]; ep?: readonly number[] }) {
  const tps = checkList('tp', sizes.tp ?? [1]);
  const pps = checkList('pp', sizes.pp ?? [1]);
  const eps = checkList('ep', sizes.ep ?? [1]);
  return tps.flatMap((tp) => pps.flatMap((pp) => eps.map((ep): ParallelConfig => ({ tp, pp, ep }))));
}

function checkList(name: string, values: readonly number[]): number[] {
  if (!Array.isArray(values) || values.length === 0) throw new BadArgumentError(`${name} must list at least one value`);
  for (const v of values)
    if (!Number.isSafeInteger(v) || v < 1)
      throw new BadArgumentError(`${name} must list positive integers (got ${String(v)})`);
  return [...new Set(values)].sort((a, b) => a - b);
}

const round3 = (x: number) => +x.toFixed(3);

/** Measures a profile of `model` on this machine: each layout of `options.layouts` (default TP 1). */
export async function measureProfile(options: MeasureProfileOptions): Promise<Profile> {
  const base = options.quick ? QUICK_SWEEP : DEFAULT_SWEEP;
  const sweep = { ...base, ...options.sweep };
  const checked: CheckedSweep = {
    isls: checkList('isl', sweep.isl),
    batches: checkList('batch', sweep.batch),
    contexts: checkList('context', sweep.context),
    repeats: sweep.repeats,
    decodeSteps: sweep.decodeSteps,
  };
  for (const [name, v] of [
    ['repeats', sweep.repeats],
    ['decodeSteps', sweep.decodeSteps],
  ] as const)
    if (!Number.isSafeInteger(v) || v < 1) throw new BadArgumentError(`${name} must be a positive integer (got ${v})`);
  const asked = (options.layouts ?? [{}]).map((l) => ({ tp: l.tp ?? 1, pp: l.pp ?? 1, ep: l.ep ?? 1 }));
  if (asked.length === 0) throw new BadArgumentError('layouts must list at least one layout');
  const seed = options.seed ?? 0;
  const started = performance.now();

  const layouts: ProfileLayout[] = [];
  const skippedLayouts: SkippedLayout[] = [];
  let first: { device: Profile['device']; blockSize: number; dtype: 'fp32' | 'bf16' } | undefined;
  for (const parallelism of asked) {
    let opened: OpenedModel;
    try {
      opened = await openModel({
        model: options.model,
        device: options.device ?? 'auto',
        seed,
        tensorParallelSize: parallelism.tp,
        pipelineParallelSize: parallelism.pp,
        expertParallelSize: parallelism.ep,
        ...(options.threads !== undefined ? { threads: options.threads } : {}),
      });
    } catch (error) {
      if (!(error instanceof ParallelLayoutError)) throw error;
      skippedLayouts.push({ parallelism, reason: error.message });
      options.onSkipLayout?.(layoutName(parallelism), error.message);
      continue;
    }
    try {
      const point = await measureLayout(opened, checked, seed, options);
      layouts.push({ parallelism, gpusPerReplica: rankCount(parallelism), ...point });
      if (!first) {
        const caps = await capabilities();
        first = {
          device:
            opened.device === 'cuda'
              ? { kind: 'cuda', name: caps.cuda.devices[0]?.name ?? 'unknown GPU' }
              : { kind: 'cpu', name: caps.cpu.model, threads: (opened.runner as { threads: number }).threads },
          blockSize: opened.engine.info.blockSize,
          dtype: opened.device === 'cuda' ? 'bf16' : 'fp32',
        };
      }
    } finally {
      await opened.dispose();
    }
  }
  if (!first)
    throw new BadArgumentError(
      `no layout asked for fits ${options.model}: ${skippedLayouts.map((s) => `${layoutName(s.parallelism)}: ${s.reason}`).join('; ')}`,
    );
  return parseProfile(
    {
      format: PROFILE_FORMAT,
      version: PROFILE_VERSION,
      model: options.model,
      createdAt: new Date().toISOString(),
      tandemVersion: packageVersion,
      device: first.device,
      engine: {
        blockSize: first.blockSize,
        maxNumBatchedTokens: DEFAULT_MAX_NUM_BATCHED_TOKENS,
        maxNumSeqs: DEFAULT_MAX_NUM_SEQS,
        dtype: first.dtype,
      },
      measurement: {
        quick: options.quick ?? false,
        repeats: sweep.repeats,
        decodeSteps: sweep.decodeSteps,
        seed,
        durationS: +((performance.now() - started) / 1000).toFixed(1),
      },
      layouts,
      skippedLayouts,
    },
    'the measured profile',
  );
}

interface CheckedSweep {
  isls: number[];
  batches: number[];
  contexts: number[];
  repeats: number;
  decodeSteps: number;
}

/** One layout's points, measured on an opened engine (the module comment says how). */
async function measureLayout(
  opened: OpenedModel,
  sweep: CheckedSweep,
  seed: number,
  options: MeasureProfileOptions,
): Promise<Omit<ProfileLayout, 'parallelism' | 'gpusPerReplica'>> {
  const { isls, batches, contexts } = sweep;
  const name = layoutName(opened.parallel);
  // Points are named with their layout when several are measured.
  const label = (point: string) => ((options.layouts?.length ?? 1) > 1 ? `${name} ${point}` : point);
  const { engine } = opened;
  const { vocabSize, blockSize, numBlocks, maxModelLen } = engine.info;
  const random = seededSource(seed, 'profile-prompts');
  const prompt = (length: number) => Int32Array.from({ length }, () => Math.floor(random() * vocabSize));
  const blocksFor = (tokens: number) => Math.ceil(tokens / blockSize);
  const total = isls.length + batches.length * contexts.length;
  let done = 0;
  const progress = (point: string) => options.onProgress?.({ done: done++, total, point: label(point) });

  const prefillOnce = async (isl: number) => {
    const t0 = performance.now();
    const result = await engine.prefillOnly({
      promptTokenIds: prompt(isl),
      sampling: { temperature: 0, maxTokens: 1 },
    });
    const ms = performance.now() - t0;
    engine.releaseBlocks(result.blockIds);
    return ms;
  };
  // Not counted: what the first forward of a shape pays (kernel loads, scratch growth).
  await prefillOnce(Math.min(isls[0]!, maxModelLen - 1));

  const prefill: PrefillPoint[] = [];
  for (const isl of isls) {
    progress(`prefill isl ${isl}`);
    if (isl >= maxModelLen || blocksFor(isl + 1) > numBlocks) {
      options.onSkip?.(
        label(`prefill isl ${isl}`),
        `over the engine's ${maxModelLen} tokens or its ${numBlocks}-block KV pool`,
      );
      continue;
    }
    const runs: number[] = [];
    // A GPU's first step of a shape pays for its kernels and scratch; a CPU's does not, and its prompts are slow.
    if (opened.device === 'cuda') await prefillOnce(isl);
    for (let i = 0; i < sweep.repeats; i++) runs.push(await prefillOnce(isl));
    prefill.push({
      isl,
      ms: round3(median(runs)),
      msMin: round3(Math.min(...runs)),
      msMax: round3(Math.max(...runs)),
      samples: runs.length,
    });
  }

  const steps = WARMUP_STEPS + sweep.decodeSteps;
  const decode: DecodePoint[] = [];
  for (const context of contexts)
    for (const batch of batches) {
      const point = `decode batch ${batch} context ${context}`;
      progress(point);
      const length = context + steps + 1;
      if (length > maxModelLen || batch * blocksFor(length) > numBlocks || batch > DEFAULT_MAX_NUM_SEQS) {
        options.onSkip?.(
          label(point),
          `${batch} x ${length} tokens do not fit the ${numBlocks} x ${blockSize}-token KV pool or the model's ${maxModelLen}`,
        );
        continue;
      }
      const handles = [];
      for (let i = 0; i < batch; i++) {
        const tokens = prompt(context);
        const { blockIds } = engine.allocateBlocks(tokens);
        handles.push(
          engine.decodeFromBlocks(
            // The first request's first step runs alone, before the others are in: it takes one step more,
            // so that all end on the same step.
            { promptTokenIds: tokens, sampling: { temperature: 0, maxTokens: steps + (i === 0 ? 2 : 1) } },
            blockIds,
            tokens[context - 1]!,
          ),
        );
      }
      // Every sequence gets its token in the same step: the gaps of the last one are the step times.
      const times: number[] = [];
      const others = handles.slice(0, -1).map((h) => h.result());
      for await (const _ of handles[handles.length - 1]!) times.push(performance.now());
      await Promise.all(others);
      const gaps = times.slice(WARMUP_STEPS + 1).map((t, i) => t - times[WARMUP_STEPS + i]!);
      decode.push({
        batch,
        context,
        stepMs: round3(median(gaps)),
        stepMsMin: round3(Math.min(...gaps)),
        stepMsMax: round3(Math.max(...gaps)),
        samples: gaps.length,
      });
    }
  options.onProgress?.({ done: total, total, point: label('done') });
  if (prefill.length === 0 || decode.length === 0)
    throw new BadArgumentError(
      `no ${prefill.length === 0 ? 'prefill' : 'decode'} point fits this engine (${name}: ${numBlocks} blocks of ${blockSize} tokens, ${maxModelLen} tokens per sequence): choose smaller --isl, --batch or --context`,
    );
  return { kvCapacityTokens: numBlocks * blockSize, maxModelLen, prefill, decode };
}

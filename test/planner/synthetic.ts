/**
 * Synthetic profiles for planner tests: prefill and decode times from simple cost formulas (a fixed cost plus
 * per-token and attention terms), with optional seeded noise, in the profile file's shape.
 */
import {
  planCapacity,
  PROFILE_FORMAT,
  PROFILE_VERSION,
  UnmeetablePlanError,
  type CapacityRequest,
  type Profile,
  type ProfileLayout,
} from '../../lib/planner/index.js';

export interface SyntheticLayout {
  tp?: number;
  /** Speed-up over tp 1 (a TP 2 replica is ~1.8x faster). */
  speedup?: number;
  /** Speed-up of decode steps alone, when it differs from prefill's (default: speedup). */
  decodeSpeedup?: number;
  kvCapacityTokens?: number;
  isl?: number[];
  batch?: number[];
  context?: number[];
  /** Relative noise on every point, e.g. 0.2: each time x (1 +- 0.2), seeded. */
  noise?: number;
  seed?: number;
}

/** Mulberry32: a small seeded generator for test data. */
export function seeded(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** ms of one prompt alone: 2 ms + 0.05 ms per token + attention 1e-5 ms per token squared (tp 1). */
export const prefillCost = (isl: number) => 2 + 0.05 * isl + 1e-5 * isl * isl;
/** ms of one decode step: 5 ms of weights + 0.1 ms per sequence + 2e-4 ms per token of KV read (tp 1). */
export const stepCost = (batch: number, context: number) => 5 + 0.1 * batch + 2e-4 * batch * context;

export function syntheticLayout(o: SyntheticLayout = {}): ProfileLayout {
  const tp = o.tp ?? 1;
  const speedup = o.speedup ?? 1;
  const decodeSpeedup = o.decodeSpeedup ?? speedup;
  const random = seeded(o.seed ?? 1);
  const noisy = (x: number) => (o.noise ? Math.max(1e-4, +(x * (1 + o.noise * (2 * random() - 1))).toFixed(4)) : x);
  const point = (ms: number) => ({ ms, msMin: ms, msMax: ms, samples: 3 });
  return {
    parallelism: { tp, pp: 1, ep: 1 },
    gpusPerReplica: tp,
    kvCapacityTokens: o.kvCapacityTokens ?? 200_000 * tp,
    maxModelLen: 32768,
    prefill: (o.isl ?? [128, 256, 512, 1024, 2048, 4096, 8192]).map((isl) => ({
      isl,
      ...point(noisy(prefillCost(isl) / speedup)),
    })),
    decode: (o.context ?? [256, 1024, 4096, 16384]).flatMap((context) =>
      (o.batch ?? [1, 2, 4, 8, 16, 32, 64, 128, 256]).map((batch) => {
        const ms = noisy(stepCost(batch, context) / decodeSpeedup);
        return { batch, context, stepMs: ms, stepMsMin: ms, stepMsMax: ms, samples: 8 };
      }),
    ),
  };
}

export function syntheticProfile(layouts: ProfileLayout[] = [syntheticLayout()]): Profile {
  return {
    format: PROFILE_FORMAT,
    version: PROFILE_VERSION,
    model: 'synthetic',
    createdAt: '2026-12-06T12:00:00.000Z',
    tandemVersion: '0.1.0',
    device: { kind: 'cuda', name: 'synthetic GPU' },
    engine: { blockSize: 16, maxNumBatchedTokens: 512, maxNumSeqs: 256, dtype: 'bf16' },
    measurement: { quick: false, repeats: 3, decodeSteps: 8, seed: 0, durationS: 1 },
    layouts,
    skippedLayouts: [],
  };
}

/** planCapacity's plan, or null where no plan meets the SLAs (property tests compare the plans that exist). */
export function planOrNull(profile: Profile, request: CapacityRequest) {
  try {
    return planCapacity(profile, request);
  } catch (error) {
    if (error instanceof UnmeetablePlanError) return null;
    throw error;
  }
}

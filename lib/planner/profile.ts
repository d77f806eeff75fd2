/**
 * A performance profile: what one engine replica of a model does on one kind of device, measured by
 * `tandem profile` (lib/planner/profiler.ts) through the engine that serves. The planner sizes pools from it.
 *
 * One file, JSON, versioned (`format`, `version`); validated with zod on load, every problem named with its
 * path. A profile holds one entry per parallel layout measured (`layouts`: TP, PP, EP sizes, each with the devices
 * one replica takes, ranks = max(tp, ep) x pp as lib/engine/parallel.ts counts them), and the layouts asked for that
 * the model does not allow, with why (`skippedLayouts`).
 * Version 2; a version 1 file (the same layouts, devices tp x pp, no skippedLayouts) is read as version 2.
 *   prefill: time of one prompt of `isl` tokens alone on the replica (the prefill worker's `prefillOnly`).
 *   decode:  time of one decode step of `batch` sequences with `context` tokens each in the KV cache at its start
 *            (the decode worker's `decodeFromBlocks`).
 */
import { readFileSync, writeFileSync, mkdirSync } from 'node:fs';
import { dirname } from 'node:path';
import { z } from 'zod';
import { rankCount } from '../engine/parallel.js';
import { ProfileError } from './errors.js';

export const PROFILE_FORMAT = 'tandem-profile';
export const PROFILE_VERSION = 2;

const positiveInt = z.number().int().min(1);
const positiveMs = z.number().positive().finite();

const ParallelismSchema = z.strictObject({
  tp: positiveInt,
  pp: positiveInt,
  ep: positiveInt,
});

const PrefillPointSchema = z.strictObject({
  isl: positiveInt,
  /** Median over `samples` runs. */
  ms: positiveMs,
  msMin: positiveMs,
  msMax: positiveMs,
  samples: positiveInt,
});

const DecodePointSchema = z.strictObject({
  batch: positiveInt,
  /** Tokens in each sequence's KV cache when the timed steps start. */
  context: positiveInt,
  /** Median step time over `samples` steps. */
  stepMs: positiveMs,
  stepMsMin: positiveMs,
  stepMsMax: positiveMs,
  samples: positiveInt,
});

/** Devices one replica of a layout takes: version 1 counted tp x pp; version 2 counts ranks, max(tp, ep) x pp. */
const devicesOf = {
  1: (p: { tp: number; pp: number }) => ({ devices: p.tp * p.pp, rule: 'tp x pp' }),
  2: (p: { tp: number; pp: number; ep: number }) => ({ devices: rankCount(p), rule: 'max(tp, ep) x pp' }),
} as const;

const layoutSchema = (version: 1 | 2) =>
  z
    .strictObject({
      parallelism: ParallelismSchema,
      /** Devices that one replica of this layout takes: GPUs, or on the CPU engine ranks. */
      gpusPerReplica: positiveInt,
      /** Tokens of KV cache one replica holds (blocks x block size). */
      kvCapacityTokens: positiveInt,
      /** Longest sequence a replica serves. */
      maxModelLen: positiveInt,
      prefill: z.array(PrefillPointSchema).min(1),
      decode: z.array(DecodePointSchema).min(1),
    })
    .superRefine((layout, ctx) => {
      const { devices, rule } = devicesOf[version](layout.parallelism);
      if (layout.gpusPerReplica !== devices)
        ctx.addIssue({
          code: 'custom',
          path: ['gpusPerReplica'],
          message: `must be ${rule} = ${devices} (got ${layout.gpusPerReplica})`,
        });
      const isls = new Set<number>();
      layout.prefill.forEach((p, i) => {
        if (isls.has(p.isl))
          ctx.addIssue({ code: 'custom', path: ['prefill', i, 'isl'], message: `isl ${p.isl} is listed twice` });
        isls.add(p.isl);
        if (!(p.msMin <= p.ms && p.ms <= p.msMax))
          ctx.addIssue({ code: 'custom', path: ['prefill', i], message: 'must have msMin <= ms <= msMax' });
      });
      const keys = new Set<string>();
      layout.decode.forEach((d, i) => {
        const key = `${d.batch}x${d.context}`;
        if (keys.has(key))
          ctx.addIssue({
            code: 'custom',
            path: ['decode', i],
            message: `batch ${d.batch} at context ${d.context} is listed twice`,
          });
        keys.add(key);
        if (!(d.stepMsMin <= d.stepMs && d.stepMs <= d.stepMsMax))
          ctx.addIssue({ code: 'custom', path: ['decode', i], message: 'must have stepMsMin <= stepMs <= stepMsMax' });
      });
    });

/** A layout asked for that the model does not allow (checkParallelConfig's reason), or the device does not run. */
const SkippedLayoutSchema = z.strictObject({ parallelism: ParallelismSchema, reason: z.string().min(1) });

const profileSchema = (version: 1 | 2) =>
  z
    .strictObject({
      format: z.literal(PROFILE_FORMAT),
      version: z.literal(version),
      model: z.string().min(1),
      /** ISO 8601 time the measurement ended. */
      createdAt: z.iso.datetime(),
      tandemVersion: z.string().min(1),
      device: z.strictObject({
        kind: z.enum(['cpu', 'cuda']),
        /** CPU model or GPU name. */
        name: z.string(),
        /** CPU engine: compute threads; GPU engine: absent. */
        threads: positiveInt.optional(),
      }),
      /** The engine settings the measurement ran with (those of a serving worker with default options). */
      engine: z.strictObject({
        blockSize: positiveInt,
        maxNumBatchedTokens: positiveInt,
        maxNumSeqs: positiveInt,
        dtype: z.enum(['fp32', 'bf16']),
      }),
      measurement: z.strictObject({
        quick: z.boolean(),
        /** Runs per prefill point. */
        repeats: positiveInt,
        /** Timed steps per decode point. */
        decodeSteps: positiveInt,
        seed: z.number().int().min(0),
        durationS: z.number().nonnegative(),
      }),
      layouts: z.array(layoutSchema(version)).min(1),
      ...(version === 2 ? { skippedLayouts: z.array(SkippedLayoutSchema) } : {}),
    })
    .superRefine((profile, ctx) => {
      const seen = new Set<string>();
      profile.layouts.forEach((l, i) => {
        const key = layoutName(l.parallelism);
        if (seen.has(key))
          ctx.addIssue({ code: 'custom', path: ['layouts', i], message: `layout ${key} is listed twice` });
        seen.add(key);
      });
    });

export const ProfileSchema = profileSchema(2);
const ProfileSchemaV1 = profileSchema(1);

export type Profile = z.infer<typeof ProfileSchema> & { skippedLayouts: SkippedLayout[] };
export type SkippedLayout = z.infer<typeof SkippedLayoutSchema>;
export type ProfileLayout = Profile['layouts'][number];
export type Parallelism = ProfileLayout['parallelism'];
export type PrefillPoint = ProfileLayout['prefill'][number];
export type DecodePoint = ProfileLayout['decode'][number];

/** `tp1`, `tp2pp2`, `tp4ep4`: a layout's short name, in tables and messages. */
export function layoutName(p: Parallelism): string {
  return `tp${p.tp}${p.pp > 1 ? `pp${p.pp}` : ''}${p.ep > 1 ? `ep${p.ep}` : ''}`;
}

function formatIssuePath(path: readonly PropertyKey[]): string {
  let out = '';
  for (const k of path) out += typeof k === 'number' ? `[${k}]` : `${out ? '.' : ''}${String(k)}`;
  return out || '(top level)';
}

/**
 * Validates a parsed profile; ProfileError lists every problem (`source: path: message`). A version 1 profile is
 * validated as version 1 and returned as version 2 (no layouts skipped: version 1 did not record them).
 */
export function parseProfile(value: unknown, source = 'profile'): Profile {
  const v1 = (value as { version?: unknown } | null)?.version === 1;
  const result = v1 ? ProfileSchemaV1.safeParse(value) : ProfileSchema.safeParse(value);
  if (result.success)
    return (v1 ? { ...result.data, version: PROFILE_VERSION, skippedLayouts: [] } : result.data) as Profile;
  const lines = result.error.issues.map((i) => `${source}: ${formatIssuePath(i.path)}: ${i.message}`);
  throw new ProfileError(lines.join('\n'));
}

/** Reads and validates a profile file. ProfileError when it is missing, not JSON or not a valid profile. */
export function loadProfile(path: string): Profile {
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    throw new ProfileError(`${path}: cannot read the profile (${code ?? (error as Error).message})`, { cause: error });
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (error) {
    throw new ProfileError(`${path}: not JSON (${(error as Error).message})`, { cause: error });
  }
  return parseProfile(json, path);
}

/** Writes a profile (validated first, so that a file written is a file that loads). */
export function writeProfile(path: string, profile: Profile): void {
  const valid = parseProfile(profile, path);
  mkdirSync(dirname(path), { recursive: true });
  writeFileSync(path, JSON.stringify(valid, null, 2) + '\n');
}

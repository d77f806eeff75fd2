/**
 * A seeded serving workload: how many requests, their prompt and output lengths, when they arrive, and what
 * their prompts share. The same spec and seed give the same workload on every run and for every deployment.
 *
 * Lengths and arrival intervals are drawn once and kept across the points of a sweep (only the rate or the
 * concurrency changes). The prompt texts are drawn per point (`seed`, point index): a later point must not find
 * an earlier point's prompts in the server's prefix cache. Shared prefixes and trace blocks are shared within
 * a point, which is what they are for.
 *
 * Sources of prompts:
 *   plain          random words, `isl` tokens.
 *   shared prefix  `prefixes` texts of `prefixTokens` tokens each; a request starts with one of them (chosen
 *                  uniformly) with probability `share`, and random words make up the rest of its length.
 *   trace          Mooncake's records: arrival, input and output length from each line; prompts share the
 *                  blocks of `blockTokens` tokens that their hash_ids name (one text per hash id).
 */
import { randomInt } from 'd3-random';
import { BadArgumentError } from '../errors.js';
import { drawLengths, seededSource, unitIntervals, type ArrivalSpec, type LengthSpec } from './distributions.js';
import { joinText, type PromptFactory } from './prompts.js';
import type { TraceRequest } from './trace.js';

export interface SharedPrefixSpec {
  /** Distinct prefixes. */
  count: number;
  /** Tokens in each. */
  tokens: number;
  /** Share of requests that start with one, in [0, 1]. */
  share: number;
}

export interface WorkloadSpec {
  seed: number;
  /** Requests per point (a trace: at most its lines). */
  numRequests: number;
  isl: LengthSpec;
  osl: LengthSpec;
  arrival: ArrivalSpec;
  sharedPrefix?: SharedPrefixSpec;
  trace?: { requests: TraceRequest[]; blockTokens: number };
}

/** What a workload fixes for every point: lengths and arrival pattern. */
export interface WorkloadShape {
  count: number;
  /** Prompt tokens each request asks for (as the server counts them: BOS, chat template included). */
  inputLengths: Int32Array;
  outputLengths: Int32Array;
  /** Unit inter-arrival intervals (mean 1); a trace: null. */
  unitIntervals: Float64Array | null;
  /** A trace: arrival times in ms from its first request; else null. */
  traceTimesMs: Float64Array | null;
}

export interface WorkloadRequest {
  index: number;
  text: string;
  /** Prompt tokens as the server will count them (the length asked for unless it could not be reached). */
  promptTokens: number;
  outputTokens: number;
  /** The shared prefix it starts with (index), or -1. */
  prefix: number;
}

/** Draws a workload's lengths and arrival pattern. Throws BadArgumentError on a spec that cannot be drawn. */
export function workloadShape(spec: WorkloadSpec): WorkloadShape {
  if (!Number.isSafeInteger(spec.numRequests) || spec.numRequests < 1)
    throw new BadArgumentError(`the number of requests must be a positive integer (got ${spec.numRequests})`);
  if (spec.trace) {
    const lines = spec.trace.requests.slice(0, spec.numRequests);
    const t0 = lines[0]!.timestampMs;
    return {
      count: lines.length,
      inputLengths: Int32Array.from(lines, (r) => r.inputLength),
      outputLengths: Int32Array.from(lines, (r) => r.outputLength),
      unitIntervals: null,
      traceTimesMs: Float64Array.from(lines, (r) => r.timestampMs - t0),
    };
  }
  const n = spec.numRequests;
  return {
    count: n,
    inputLengths: drawLengths(spec.isl, n, seededSource(spec.seed, 'isl')),
    outputLengths: drawLengths(spec.osl, n, seededSource(spec.seed, 'osl')),
    unitIntervals: unitIntervals(spec.arrival, n, seededSource(spec.seed, 'arrivals')),
    traceTimesMs: null,
  };
}

/** The prompts of point `point` (0, 1, ...) of a sweep, for `shape`. */
export function workloadRequests(
  spec: WorkloadSpec,
  shape: WorkloadShape,
  factory: PromptFactory,
  point: number,
): WorkloadRequest[] {
  const salt = `point ${point}`;
  const words = seededSource(spec.seed, `${salt} words`);
  const out: WorkloadRequest[] = [];
  if (spec.trace) {
    const B = spec.trace.blockTokens;
    const blocks = new Map<number, string>();
    const block = (id: number) => {
      let text = blocks.get(id);
      if (text === undefined) {
        text = factory.piece(B, seededSource(spec.seed, `${salt} block ${id}`));
        blocks.set(id, text);
      }
      return text;
    };
    for (let i = 0; i < shape.count; i++) {
      const { hashIds } = spec.trace.requests[i]!;
      const total = shape.inputLengths[i]!;
      // Whole blocks as the prefix; the next block (cut) leads the rest, so that equal hash ids give equal text.
      const whole = Math.min(hashIds.length, Math.max(0, Math.floor((total - factory.overhead) / B)));
      let prefix = '';
      for (let b = 0; b < whole; b++) prefix = joinText(prefix, block(hashIds[b]!));
      const lead = whole < hashIds.length ? block(hashIds[whole]!) : '';
      const p = factory.fit(total, words, prefix, lead);
      out.push({ index: i, text: p.text, promptTokens: p.tokens, outputTokens: shape.outputLengths[i]!, prefix: -1 });
    }
    return out;
  }
  const shared = spec.sharedPrefix;
  const prefixes = shared
    ? Array.from({ length: shared.count }, (_, k) =>
        factory.piece(shared.tokens, seededSource(spec.seed, `${salt} prefix ${k}`)),
      )
    : [];
  // Which requests share a prefix does not change between points.
  const shares = seededSource(spec.seed, 'prefix share');
  const pick = randomInt.source(seededSource(spec.seed, 'prefix pick'))(Math.max(1, prefixes.length));
  for (let i = 0; i < shape.count; i++) {
    const prefix = shared && shares() < shared.share ? pick() : -1;
    const p = factory.fit(shape.inputLengths[i]!, words, prefix >= 0 ? prefixes[prefix]! : '');
    out.push({ index: i, text: p.text, promptTokens: p.tokens, outputTokens: shape.outputLengths[i]!, prefix });
  }
  return out;
}

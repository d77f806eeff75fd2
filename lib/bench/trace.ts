/**
 * Request traces in Mooncake's JSONL format (github.com/kvcache-ai/Mooncake, FAST'25 traces): one request per
 * line,
 *
 *   {"timestamp": 27482, "input_length": 6955, "output_length": 52, "hash_ids": [46, 47, 48, ...]}
 *
 * `timestamp` is the arrival in milliseconds; `hash_ids` names the prompt's blocks of `blockSize` tokens (512 in
 * Mooncake's traces): two requests whose lists start alike share that many blocks of prompt, which is what a
 * prefix cache sees. Blank lines are skipped; fields not named here are ignored. A line that is not such a
 * record is a TraceFormatError naming the file, the line number and the field.
 *
 * `phasedTrace` generates one: seeded phases of Poisson arrivals (the planner's traffic shift, bench:planner), which
 * `traceToJsonl` writes in the same format.
 */
import { readFileSync } from 'node:fs';
import { randomExponential } from 'd3-random';
import { z } from 'zod';
import { TandemError } from '../errors.js';
import { seededSource } from './distributions.js';

/** Mooncake's block size, in tokens, of `hash_ids`. */
export const MOONCAKE_BLOCK_TOKENS = 512;

/** A trace line that is not a request record: `file:line: what is wrong` (line 0: the whole file). */
export class TraceFormatError extends TandemError {
  constructor(
    readonly source: string,
    readonly line: number,
    detail: string,
  ) {
    super('TANDEM_BAD_TRACE', `${source}${line > 0 ? `:${line}` : ''}: ${detail}`);
  }
}

export interface TraceRequest {
  /** Line number in the file (1-based). */
  line: number;
  timestampMs: number;
  inputLength: number;
  outputLength: number;
  /** Block hashes of the prompt, in order; empty when the line has none (a prompt shared with no one). */
  hashIds: number[];
}

const count = () => z.number().int().min(1).refine(Number.isSafeInteger, 'must be a safe integer');
const TraceLine = z.looseObject({
  timestamp: z.number().min(0).refine(Number.isFinite, 'must be finite'),
  input_length: count(),
  output_length: count(),
  hash_ids: z.array(z.number().int().min(0).refine(Number.isSafeInteger, 'must be a safe integer')).optional(),
});

/** Parses trace text; `source` names it in errors. Requests come back in arrival order (stable for equal times). */
export function parseTrace(text: string, source = 'trace.jsonl'): TraceRequest[] {
  const out: TraceRequest[] = [];
  const lines = text.split('\n');
  for (let i = 0; i < lines.length; i++) {
    const raw = lines[i]!.trim();
    if (raw === '') continue;
    const lineNo = i + 1;
    let json: unknown;
    try {
      json = JSON.parse(raw);
    } catch (error) {
      throw new TraceFormatError(source, lineNo, `not JSON (${(error as Error).message})`);
    }
    if (json === null || typeof json !== 'object' || Array.isArray(json))
      throw new TraceFormatError(source, lineNo, 'not a JSON object');
    const parsed = TraceLine.safeParse(json);
    if (!parsed.success) {
      const issue = parsed.error.issues[0]!;
      const field = issue.path
        .map((k) => (typeof k === 'number' ? `[${k}]` : String(k)))
        .join('.')
        .replace(/\.\[/g, '[');
      const missing = issue.code === 'invalid_type' && /received undefined/.test(issue.message);
      throw new TraceFormatError(source, lineNo, `${field}: ${missing ? 'is required' : issue.message}`);
    }
    const r = parsed.data;
    out.push({
      line: lineNo,
      timestampMs: r.timestamp,
      inputLength: r.input_length,
      outputLength: r.output_length,
      hashIds: r.hash_ids ?? [],
    });
  }
  if (out.length === 0) throw new TraceFormatError(source, 0, 'the trace has no requests');
  return out.sort((a, b) => a.timestampMs - b.timestampMs);
}

/** Reads and parses a trace file. Throws TraceFormatError (a file that cannot be read: line 0). */
export function loadTrace(path: string): TraceRequest[] {
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch (error) {
    throw new TraceFormatError(path, 0, `cannot read: ${(error as Error).message}`);
  }
  return parseTrace(text, path);
}

/** One phase of a generated trace: its requests' lengths and arrival rate, for `seconds`. */
export interface TracePhase {
  name: string;
  /** Prompt tokens of each request (drawn uniformly within +-`jitter` of it). */
  isl: number;
  /** Output tokens of each request (likewise). */
  osl: number;
  /** Poisson arrivals, requests per second. */
  rate: number;
  seconds: number;
}

export interface PhasedTrace {
  requests: TraceRequest[];
  /** The phase of each request (index into the phases). */
  phaseOf: Int32Array;
  /** Where each phase starts, ms from the trace's start. */
  phaseStartMs: number[];
}

/**
 * A seeded trace of phases one after another (a traffic shift: long prompts and short answers, then short prompts
 * and long answers, say): Poisson arrivals at each phase's rate, lengths within +-`jitter` (a share) of the phase's.
 * No request shares a prompt block with another (hash_ids unique). The same spec and seed give the same trace.
 */
export function phasedTrace(phases: readonly TracePhase[], seed: number, jitter = 0.1): PhasedTrace {
  if (phases.length === 0) throw new TraceFormatError('generated trace', 0, 'no phases');
  if (!(jitter >= 0 && jitter < 1))
    throw new TraceFormatError('generated trace', 0, `jitter ${jitter} is not in [0, 1)`);
  const requests: TraceRequest[] = [];
  const phaseOf: number[] = [];
  const phaseStartMs: number[] = [];
  let startMs = 0;
  let nextHash = 0;
  phases.forEach((phase, p) => {
    for (const [key, v] of [
      ['isl', phase.isl],
      ['osl', phase.osl],
      ['rate', phase.rate],
      ['seconds', phase.seconds],
    ] as const)
      if (!(v > 0 && Number.isFinite(v)))
        throw new TraceFormatError('generated trace', 0, `phase ${phase.name}: ${key} must be > 0 (got ${v})`);
    phaseStartMs.push(startMs);
    const gaps = randomExponential.source(seededSource(seed, `phase ${p} arrivals`))(phase.rate / 1000);
    const lengths = seededSource(seed, `phase ${p} lengths`);
    const around = (n: number) => Math.max(1, Math.round(n * (1 + jitter * (2 * lengths() - 1))));
    const endMs = startMs + phase.seconds * 1000;
    for (let t = startMs + gaps(); t < endMs; t += gaps()) {
      const inputLength = around(phase.isl);
      requests.push({
        line: requests.length + 1,
        timestampMs: Math.round(t),
        inputLength,
        outputLength: around(phase.osl),
        hashIds: Array.from({ length: Math.ceil(inputLength / MOONCAKE_BLOCK_TOKENS) }, () => nextHash++),
      });
      phaseOf.push(p);
    }
    startMs = endMs;
  });
  return { requests, phaseOf: Int32Array.from(phaseOf), phaseStartMs };
}

/** A trace as Mooncake's JSONL (what `bench:serve --trace` reads back). */
export function traceToJsonl(requests: readonly TraceRequest[]): string {
  return requests
    .map((r) =>
      JSON.stringify({
        timestamp: r.timestampMs,
        input_length: r.inputLength,
        output_length: r.outputLength,
        hash_ids: r.hashIds,
      }),
    )
    .join('\n')
    .concat('\n');
}

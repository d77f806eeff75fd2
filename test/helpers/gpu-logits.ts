/** What the GPU engine tests (test/gpu/05, 07, 09) share: bf16 logit comparison, fixtures, env switches. */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, expect } from 'vitest';
import type { LlmEngine } from '../../lib/engine/llm-engine.js';
import type { ForwardBatch } from '../../lib/engine/runner.js';

// bf16 weights and KV (8 mantissa bits) against fp32: a relative logit error of a few 1e-3 is what the format
// gives on these models; 2e-2 leaves room and still catches a wrong kernel (errors of order 1).
export const BF16_TOLERANCE = 2e-2;

/** ||a - b|| / ||b|| (the L2 error; test/helpers/forward-batch.ts's relativeError is the max-norm one). */
export function relativeL2Error(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let num = 0;
  let den = 0;
  for (let i = 0; i < b.length; i++) {
    num += (a[i]! - b[i]!) ** 2;
    den += b[i]! ** 2;
  }
  return Math.sqrt(num / den);
}

export function argmax(row: ArrayLike<number>): number {
  let best = 0;
  for (let i = 1; i < row.length; i++) if (row[i]! > row[best]!) best = i;
  return best;
}

/** The gap between a row's best and second-best logit. */
export function topMargin(row: ArrayLike<number>): number {
  const best = argmax(row);
  let second = -Infinity;
  for (let i = 0; i < row.length; i++) if (i !== best) second = Math.max(second, row[i]!);
  return row[best]! - second;
}

/** Two runners' logits compared row by row within BF16_TOLERANCE, keeping the worst error and argmax agreement. */
export class LogitsAgreement {
  worst = 0;
  argmaxEqual = 0;
  rows = 0;

  constructor(private readonly vocabSize: number) {}

  /** Expects each of the first `rows` rows of `a` within BF16_TOLERANCE of `b`'s; `label(s)` names row s. */
  check(a: Float32Array, b: Float32Array, rows: number, label: (s: number) => string): void {
    const V = this.vocabSize;
    for (let s = 0; s < rows; s++) {
      const rowA = a.subarray(s * V, (s + 1) * V);
      const rowB = b.subarray(s * V, (s + 1) * V);
      const rel = relativeL2Error(rowA, rowB);
      this.worst = Math.max(this.worst, rel);
      expect(rel, label(s)).toBeLessThan(BF16_TOLERANCE);
      if (argmax(rowA) === argmax(rowB)) this.argmaxEqual++;
      this.rows++;
    }
  }

  /** The figure: worst error and argmax agreement over every row checked. */
  toString(): string {
    return `worst relative error ${this.worst.toExponential(2)}; argmax equal in ${this.argmaxEqual} of ${this.rows} rows`;
  }
}

/** A committed fixture's expected.json (scripts/make-hf-fixture.py). */
export interface HfExpected {
  prompt: string;
  promptIds: number[];
  lastLogits: number[];
  greedy: number[];
  /** Smallest top-2 logit gap along the reference's greedy path (the fixture script keeps it bf16-stable). */
  minGreedyMargin?: number;
}

/** test/fixtures/<name>: its folder (a model openModel takes) and what transformers gave on it. */
export function hfFixture(name: string): { dir: string; expected: HfExpected } {
  const dir = join(import.meta.dirname, '..', 'fixtures', name);
  return { dir, expected: JSON.parse(readFileSync(join(dir, 'expected.json'), 'utf8')) as HfExpected };
}

/** `copies` greedy requests of the fixture's prompt at once, 32 tokens each (as its `greedy`): their token ids. */
export async function greedyCopies(engine: LlmEngine, expected: HfExpected, copies: number): Promise<number[][]> {
  const results = await Promise.all(
    Array.from({ length: copies }, () =>
      engine
        .addRequest({
          promptTokenIds: expected.promptIds,
          sampling: { temperature: 0, maxTokens: expected.greedy.length },
        })
        .result(),
    ),
  );
  return results.map((r) => r.tokenIds);
}

/** Puts back the named environment variables (as they are now) after each test of the calling file. */
export function restoreEnvAfterEach(...names: string[]): void {
  const saved = Object.fromEntries(names.map((name) => [name, process.env[name]]));
  afterEach(() => {
    for (const [name, value] of Object.entries(saved)) {
      if (value === undefined) delete process.env[name];
      else process.env[name] = value;
    }
  });
}

/** Sets `name` (deletes it for undefined) and then creates: the GPU engine reads its switches when a runner is
 * created (CudaLlama::init). The value stays set; restoreEnvAfterEach puts it back. */
export function withEnv<T>(name: string, value: string | undefined, create: () => Promise<T>): Promise<T> {
  if (value === undefined) delete process.env[name];
  else process.env[name] = value;
  return create();
}

/**
 * Steps over `numSeqs` sequences of `mb` blocks each (sequence s owns blocks s*mb ..): `step(seqs, n, salt)` adds
 * n tokens to each listed sequence, a deterministic function of sequence, salt and index.
 */
export function sequenceSteps(
  vocabSize: number,
  numSeqs: number,
  mb: number,
): (seqs: number[], n: number, salt: number) => ForwardBatch {
  const lens = Array<number>(numSeqs).fill(0);
  const table = (s: number) => Array.from({ length: mb }, (_, j) => s * mb + j);
  return (seqs, n, salt) => {
    const tokens: number[] = [];
    const positions: number[] = [];
    const seqStarts = [0];
    for (const s of seqs) {
      for (let i = 0; i < n; i++) {
        tokens.push((s * 31 + salt * 7 + i * 13) % vocabSize);
        positions.push(lens[s]! + i);
      }
      lens[s]! += n;
      seqStarts.push(tokens.length);
    }
    return {
      tokens: Int32Array.from(tokens),
      positions: Int32Array.from(positions),
      seqStarts: Int32Array.from(seqStarts),
      blockTables: Int32Array.from(seqs.flatMap(table)),
      maxBlocksPerSeq: mb,
      contextLens: Int32Array.from(seqs.map((s) => lens[s]!)),
    };
  };
}

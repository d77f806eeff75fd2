/**
 * What the GPU tests of tensor- and pipeline-parallel runners (test/gpu/11, 15, 17) share: step batches, the greedy
 * pass, each rank's slice of a TP 1 tensor, row-by-row agreement with TP 1, and the malformed-batch and
 * dispose-mid-pass checks.
 */
import { expect } from 'vitest';
import { DisposedError, type TandemError } from '../../lib/errors.js';
import type { CudaModelRunner } from '../../lib/engine/cuda.js';
import { tensorSlice } from '../../lib/engine/cuda-parallel.js';
import type { ModelConfig } from '../../lib/engine/model/config.js';
import { weightManifest, type ManifestTensor } from '../../lib/engine/model/manifest.js';
import type { ForwardBatch } from '../../lib/engine/runner.js';
import { forwardBatch } from './forward-batch.js';
import { argmax, relativeL2Error, topMargin } from './gpu-logits.js';

/** One sequence's part of a step: its new ids, first position and block table. */
export interface SeqPart {
  ids: number[];
  start: number;
  table: number[];
}

/** One step's batch: each sequence's new ids, first position and block table (padded to mb with -1). */
export const batchOf = (seqs: SeqPart[], mb: number): ForwardBatch =>
  forwardBatch(
    seqs.map((s) => ({ blocks: s.table, start: s.start, tokens: s.ids })),
    mb,
  );

/** `n` deterministic token ids below 256, varied by `salt`. */
export const syntheticPrompt = (n: number, salt: number): number[] =>
  Array.from({ length: n }, (_, i) => (i * 37 + salt) % 256);

/**
 * Two sequences in out-of-order block tables (mb 6): A's 70-token prompt in chunks of 40 and 30, B joining with 20
 * tokens in A's second chunk, then 5 decode steps of both. `a` and `b` hold 5 ids more than the steps use.
 */
export function twoSequenceSteps(): {
  a: number[];
  b: number[];
  tableA: number[];
  tableB: number[];
  mb: number;
  steps: SeqPart[][];
} {
  const tableA = [9, 3, 17, 5, 40, 41];
  const tableB = [22, 2, 30, 31];
  const mb = 6;
  const a = syntheticPrompt(75, 1);
  const b = syntheticPrompt(25, 7);
  const steps = [
    [{ ids: a.slice(0, 40), start: 0, table: tableA }],
    [
      { ids: a.slice(40, 70), start: 40, table: tableA },
      { ids: b.slice(0, 20), start: 0, table: tableB },
    ],
  ];
  for (let i = 0; i < 5; i++)
    steps.push([
      { ids: [a[70 + i]!], start: 70 + i, table: tableA },
      { ids: [b[20 + i]!], start: 20 + i, table: tableB },
    ]);
  return { a, b, tableA, tableB, mb, steps };
}

/** The prompt's last logits, then `steps` greedy tokens, one decode step each. */
export async function greedy(
  runner: CudaModelRunner,
  prompt: number[],
  steps: number,
): Promise<{ logits: Float32Array; tokens: number[] }> {
  const mb = 16;
  const table = Array.from({ length: mb }, (_, i) => 15 - i); // out of order on purpose
  const V = runner.vocabSize;
  const first = await runner.forward(batchOf([{ ids: prompt, start: 0, table }], mb));
  const logits = first.slice(0, V);
  const tokens = [argmax(logits)];
  for (let i = 1; i < steps; i++) {
    const out = await runner.forward(batchOf([{ ids: [tokens.at(-1)!], start: prompt.length + i - 1, table }], mb));
    tokens.push(argmax(out));
  }
  return { logits, tokens };
}

/** Rank `rank`'s slice of a whole tensor's bf16 bits (row-major), by the manifest's shard rule, as numbers. */
export function rankSliceBits(
  config: ModelConfig,
  tp: number,
  rank: number,
  tensor: ManifestTensor,
  whole: Uint16Array,
): number[] {
  const { rows, cols, fullCols } = tensorSlice(config, tp, rank, tensor);
  const out: number[] = [];
  for (let i = 0; i < rows.count; i++)
    for (let j = 0; j < cols.count; j++) out.push(whole[(rows.start + i) * fullCols + cols.start + j]!);
  return out;
}

/** Every rank holds its slice of every TP 1 tensor, bit for bit. */
export async function expectSameWeights(
  config: ModelConfig,
  one: CudaModelRunner,
  many: CudaModelRunner,
): Promise<void> {
  const tp = many.tensorParallelSize;
  for (const t of weightManifest(config)) {
    const whole = await one.readWeightBf16(t.name);
    for (let r = 0; r < tp; r++) {
      const part = await many.readWeightBf16(t.name, r);
      expect(Array.from(part), `${t.name}, rank ${r} of ${tp}`).toEqual(rankSliceBits(config, tp, r, t, whole));
    }
  }
}

// Random dummy weights can put two logits closer than the TP 1 / TP n difference: the best token is compared only
// where TP 1's margin is wider than this.
export const CLEAR_MARGIN = 0.05;

/**
 * Each of the first `nseq` rows of `y` within `tolerance` of `x`'s (relative L2 error), and `x`'s best token where
 * `x` wins by more than CLEAR_MARGIN; `label(s)` names row s. The worst error, and whether every row is bit-identical.
 */
export function expectRowsAgree(
  x: Float32Array,
  y: Float32Array,
  vocab: number,
  nseq: number,
  tolerance: number,
  label: (s: number) => string,
): { worst: number; identical: boolean } {
  let worst = 0;
  let identical = true;
  for (let s = 0; s < nseq; s++) {
    const rowX = x.subarray(s * vocab, (s + 1) * vocab);
    const rowY = y.subarray(s * vocab, (s + 1) * vocab);
    const rel = relativeL2Error(rowY, rowX);
    worst = Math.max(worst, rel);
    if (rowX.some((v, i) => v !== rowY[i])) identical = false;
    expect(rel, label(s)).toBeLessThan(tolerance);
    if (topMargin(rowX) > CLEAR_MARGIN) expect(argmax(rowY)).toBe(argmax(rowX));
  }
  return { worst, identical };
}

/**
 * Runs each step's batch on `one`, then on `other`, and expects their rows to agree (expectRowsAgree); `label(seqs,
 * s, batch)` names row s of a step. The worst error over all steps, and whether every row was bit-identical.
 */
export async function expectStepsAgree(
  one: CudaModelRunner,
  other: CudaModelRunner,
  steps: SeqPart[][],
  mb: number,
  tolerance: number,
  label: (seqs: SeqPart[], s: number, batch: ForwardBatch) => string,
): Promise<{ worst: number; identical: boolean }> {
  let worst = 0;
  let identical = true;
  for (const seqs of steps) {
    const batch = batchOf(seqs, mb);
    const x = await one.forward(batch);
    const y = await other.forward(batch);
    const rows = expectRowsAgree(x, y, one.vocabSize, seqs.length, tolerance, (s) => label(seqs, s, batch));
    worst = Math.max(worst, rows.worst);
    identical &&= rows.identical;
  }
  return { worst, identical };
}

/** One 200-token prefill over 13 blocks: long enough to be in flight when its runner is disposed. */
export const longPrefill = (): ForwardBatch =>
  batchOf([{ ids: Array.from({ length: 200 }, (_, i) => i % 256), start: 0, table: [...Array(13).keys()] }], 13);

/**
 * Disposes `runner` while `long` is in flight: the pass settles (done or DisposedError), nothing hangs; `next` is
 * then refused with DisposedError.
 */
export async function expectDisposeMidPassSettles(
  runner: CudaModelRunner,
  long: ForwardBatch,
  next: ForwardBatch,
): Promise<void> {
  const pass = runner.forward(long).then(
    () => 'done',
    (error: unknown) => (error instanceof DisposedError ? 'disposed' : error),
  );
  await runner.dispose();
  expect(['done', 'disposed']).toContain(await pass);
  await expect(runner.forward(next)).rejects.toBeInstanceOf(DisposedError);
}

/**
 * A rank group of a 16-block pool refuses a batch naming block 99 (with `refusal` where given) and then still runs
 * a 3-token prefill to `vocabSize` logits; disposed during a long prefill, it settles (expectDisposeMidPassSettles).
 */
export async function expectMalformedBatchRefusedThenDisposeSettles(
  runner: CudaModelRunner,
  vocabSize: number,
  refusal?: typeof TandemError,
): Promise<void> {
  const refused = expect(runner.forward(batchOf([{ ids: [1, 2, 3], start: 0, table: [99] }], 1))).rejects;
  await (refusal ? refused.toThrow(refusal) : refused.toThrow());
  const good = batchOf([{ ids: [1, 2, 3], start: 0, table: [0] }], 1);
  expect((await runner.forward(good)).length).toBe(vocabSize);
  await expectDisposeMidPassSettles(runner, longPrefill(), good);
}

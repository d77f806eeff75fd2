/**
 * bench:engine with tensor / pipeline / expert parallel ranks (issue 25): the CPU runner's per-rank collective time
 * (CpuModelRunner.takeCollectiveTime: each kind of collective counted on the rank that waits in it, reset on read),
 * and the benchmark's --tp / --pp / --ep: the layout in the JSON, every row's collective share of the step, the same
 * rows at one rank measured in the same run, and bad layouts refused with ParallelLayoutError's message, exit 2.
 * No timing is asserted beyond "some time was spent where a rank waits".
 */
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { CpuModelRunner } from '../../lib/engine/cpu.js';
import { dummyConfig } from '../../lib/engine/model/dummy.js';
import type { ParallelConfig } from '../../lib/engine/parallel.js';
import type { RawCollectiveTime } from '../../lib/native/binding.js';
import { forwardBatch } from '../helpers/forward-batch.js';
import { runTs } from '../helpers/cli.js';

const dir = mkdtempSync(join(tmpdir(), 'tandem-bench-engine-parallel-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** Two prompts of 6 tokens (blocks of 4), one forward: two micro-batches when there are two stages. */
const PROMPTS = forwardBatch([
  { blocks: [0, 1], start: 0, tokens: [3, 14, 15, 92, 65, 35] },
  { blocks: [2, 3], start: 0, tokens: [89, 79, 32, 38, 46, 26] },
]);

/** Each rank's collective time over one forward of PROMPTS, then what a second take returns. */
async function collectiveTimes(parallel: Partial<ParallelConfig>) {
  await using runner = await CpuModelRunner.create({
    config: dummyConfig('tiny'),
    numBlocks: 8,
    blockSize: 4,
    weights: 'dummy:tiny',
    parallel,
    threads: 2,
  });
  runner.takeCollectiveTime();
  await runner.forward(PROMPTS);
  const first = runner.takeCollectiveTime();
  return { first, second: runner.takeCollectiveTime() };
}

const ZERO: RawCollectiveTime = { allReduceMs: 0, gatherMs: 0, barrierMs: 0, handoverMs: 0 };

describe('CpuModelRunner.takeCollectiveTime', () => {
  it('is zero for one rank', async () => {
    const { first } = await collectiveTimes({});
    expect(first).toEqual([ZERO]);
  });

  it('tp 2: both ranks spend time in all-reduces and the logits gather; a take resets the sums', async () => {
    const { first, second } = await collectiveTimes({ tp: 2 });
    expect(first).toHaveLength(2);
    for (const rank of first) {
      expect(rank.allReduceMs).toBeGreaterThan(0);
      expect(rank.gatherMs).toBeGreaterThan(0);
      expect(rank.barrierMs).toBe(0); // 2 kv heads over 2 ranks: none replicated, no barrier
      expect(rank.handoverMs).toBe(0); // one stage
    }
    expect(second).toEqual([ZERO, ZERO]);
  });

  it('tp 4: replicated kv heads add barrier time on every rank', async () => {
    const { first } = await collectiveTimes({ tp: 4 });
    expect(first).toHaveLength(4);
    for (const rank of first) expect(rank.barrierMs).toBeGreaterThan(0);
  });

  it('tp 2 x pp 2: only the second stage waits for activations, only the last stage gathers logits', async () => {
    const { first } = await collectiveTimes({ tp: 2, pp: 2 });
    expect(first).toHaveLength(4);
    const [r0, r1, r2, r3] = first;
    for (const rank of [r0!, r1!]) {
      expect(rank.allReduceMs).toBeGreaterThan(0); // the embedding and stage 0's layer
      expect(rank.handoverMs).toBe(0);
      expect(rank.gatherMs).toBe(0);
    }
    for (const rank of [r2!, r3!]) {
      expect(rank.handoverMs).toBeGreaterThan(0);
      expect(rank.gatherMs).toBeGreaterThan(0);
    }
  });
});

interface Share {
  share: number;
  maxShare: number;
  maxRank: number;
  ranks: (RawCollectiveTime & { totalMs: number; share: number })[];
}
interface BenchRow {
  phase: 'prefill' | 'decode';
  batch: number;
  context: number;
  msP50: number;
  singleRank?: { msP50: number; speedup: number };
  collective?: Share;
}

const TINY = [
  '--device',
  'cpu',
  '--model',
  'dummy:tiny',
  '--quick',
  '--prompt',
  '24',
  '--batch',
  '1,2',
  '--steps',
  '4',
];

describe('bench:engine --tp / --pp / --ep', () => {
  it('--tp 2 on the CPU: the layout, each row its collective share and the same row at one rank', () => {
    const file = join(dir, 'tp2.json');
    const r = runTs('bench/engine.ts', [...TINY, '--tp', '2', '--json', file], {}, 120_000);
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/^layout tp 2 x pp 1 \(2 ranks; stage layers 0-1\)/m);
    expect(r.stdout).toMatch(
      /^phase\s+batch\s+tokens\s+context\s+ms p50\s+ms min\s+1-rank ms\s+speed-up\s+coll %\s+coll max\s/m,
    );

    const out = JSON.parse(readFileSync(file, 'utf8')) as {
      parallel: ParallelConfig & { ranks: number; layout: string };
      rows: BenchRow[];
      singleRankRows: BenchRow[];
    };
    expect(out.parallel).toEqual({ tp: 2, pp: 1, ep: 1, ranks: 2, layout: 'tp 2 x pp 1 (2 ranks; stage layers 0-1)' });
    const cases = (rows: BenchRow[]) => rows.map((row) => [row.phase, row.batch, row.context]);
    expect(cases(out.rows)).toEqual([
      ['prefill', 1, 24],
      ['decode', 1, 24],
      ['decode', 2, 24],
    ]);
    expect(cases(out.singleRankRows)).toEqual(cases(out.rows));
    out.rows.forEach((row, i) => {
      const one = out.singleRankRows[i]!;
      expect(one.collective).toBeUndefined(); // one rank has no collectives
      expect(row.singleRank?.msP50).toBe(one.msP50);
      expect(row.singleRank?.speedup).toBeCloseTo(one.msP50 / row.msP50, 9);
      const c = row.collective!;
      expect(c.ranks).toHaveLength(2);
      expect(c.share).toBeGreaterThan(0);
      expect(c.share).toBeLessThanOrEqual(1);
      expect(c.maxShare).toBeLessThanOrEqual(1);
      expect(c.maxShare).toBe(Math.max(...c.ranks.map((rank) => rank.share)));
      expect(c.ranks[c.maxRank]!.share).toBe(c.maxShare);
      expect(c.share).toBe(c.ranks[0]!.share);
      for (const rank of c.ranks) {
        expect(rank.allReduceMs).toBeGreaterThan(0);
        expect(rank.totalMs).toBeCloseTo(rank.allReduceMs + rank.gatherMs + rank.barrierMs + rank.handoverMs, 9);
      }
    });
  }, 150_000);

  it('one rank (no --tp): no one-rank rows and no collective columns', () => {
    const file = join(dir, 'single.json');
    const r = runTs('bench/engine.ts', [...TINY, '--json', file], {}, 120_000);
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/^layout single rank \(tp 1, pp 1\)$/m);
    expect(r.stdout).not.toContain('coll %');
    const out = JSON.parse(readFileSync(file, 'utf8')) as { parallel: ParallelConfig; rows: BenchRow[] };
    expect(out.parallel).toMatchObject({ tp: 1, pp: 1, ep: 1 });
    expect(out).not.toHaveProperty('singleRankRows');
    for (const row of out.rows) expect(row.collective).toBeUndefined();
  }, 150_000);

  it.each([
    [
      ['--tp', '3'],
      "--tp 3 --pp 1 --ep 1 on dummy:tiny: tensor parallel size 3 does not divide the model's 4 attention heads",
    ],
    [['--pp', '3'], "pipeline parallel size 3 is more stages than the model's 2 layers"],
    [['--ep', '2'], 'expert parallel size 2 needs a mixture-of-experts model (this one is dense)'],
    [['--tp', '0'], '--tp must be a positive integer (got 0)'],
  ])('refuses %j before loading anything, with the message and exit 2', (args, message) => {
    const r = runTs('bench/engine.ts', ['--device', 'cpu', '--model', 'dummy:tiny', ...args]);
    expect(r.status, r.stderr).toBe(2);
    expect(r.stderr).toContain(message);
    expect(r.stderr).not.toContain('loading'); // no weights were generated
    expect(r.stdout).toBe('');
  });
});

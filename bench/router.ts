/**
 * bench:router: the KV-aware router's own costs, on one core, without workers.
 *
 * - Decision latency: `KvRouter.route()` for a request of ~2,000 prompt tokens (128 blocks of 16), whose first
 *   125 blocks are a prefix some workers hold, against an index of 10k, 100k and 1M cached blocks spread over
 *   16, 64 and 256 workers. A decision hashes the prompt, walks the index and prices every worker: what a
 *   request pays in the frontend before it is sent.
 * - Event ingest: KV event batches (16 blocks an event, stored then later removed, numbered per worker) applied
 *   through `onKvEvents` to an index holding ~100k blocks over 64 workers; one event here is one block stored or
 *   removed.
 *
 * Targets (issue 23): decision p99 <= 50 us at 100k blocks x 64 workers; ingest >= 1M events/s.
 *
 *   npm run bench:router [-- --quick] [--out reports/router.json] [--chart reports/router.svg]
 */
import { mkdirSync, writeFileSync } from 'node:fs';
import { cpus } from 'node:os';
import { dirname } from 'node:path';
import { parseArgs } from 'node:util';
import { randomLcg } from 'd3-random';
import {
  axisFor,
  ChartUnavailableError,
  colourScheme,
  panels,
  writeChart,
  type ChartSpec,
} from '../lib/bench/chart.js';
import { distribution } from '../lib/bench/stats.js';
import { formatTable, sig } from '../lib/bench/table.js';
import { kvBlockHashLanes, type KvEventBatch } from '../lib/kv/index.js';
import { KvRouter, type RouteCandidate } from '../lib/router/index.js';

const BLOCK_SIZE = 16;
/** Blocks of a system prompt (a shared prefix) and of a whole request (prefix + question). */
const PREFIX_BLOCKS = 125;
const REQUEST_TOKENS = 128 * BLOCK_SIZE;
const BLOCK_COUNTS = [10_000, 100_000, 1_000_000];
const WORKER_COUNTS = [16, 64, 256];
const TARGET_P99_US = 50;
const TARGET_INGEST = 1_000_000;
const EVENT_BLOCKS = 16;

const { values } = parseArgs({
  options: {
    quick: { type: 'boolean', default: false },
    out: { type: 'string', default: 'reports/router.json' },
    chart: { type: 'string', default: 'reports/router.svg' },
    seed: { type: 'string', default: '1' },
  },
});
const quick = values.quick!;
const seed = Number(values.seed);
const decisions = quick ? 300 : 3000;
const warmup = quick ? 50 : 300;
const noDebug = Object.assign(() => {}, { enabled: false });

/** Token ids of prefix `c` (deterministic: a request regenerates the prefix it shares). */
function prefixTokens(c: number, into: Int32Array): void {
  for (let i = 0; i < PREFIX_BLOCKS * BLOCK_SIZE; i++)
    into[i] = (Math.imul(c + 1, 0x9e3779b1) ^ Math.imul(i, 0x85ebca6b)) >>> 8;
}

interface DecisionRow {
  blocks: number;
  workers: number;
  indexBlocks: number;
  p50Us: number;
  p90Us: number;
  p99Us: number;
  meanUs: number;
}

function decisionLatency(blocks: number, workers: number): DecisionRow {
  const rng = randomLcg(((seed * 7919 + blocks + workers) % 1000) / 1000);
  const router = new KvRouter({ policy: 'kv', debug: noDebug, maxWorkers: workers });
  const names = Array.from({ length: workers }, (_, w) => `decode-${w}`);
  const prefixes = Math.ceil(blocks / PREFIX_BLOCKS);
  // Each prefix lives on one worker, a third of them on a second one too (replicated hot prompts).
  const held: number[][] = names.map(() => []);
  for (let c = 0; c < prefixes; c++) {
    held[Math.floor(rng() * workers)]!.push(c);
    if (rng() < 1 / 3) held[Math.floor(rng() * workers)]!.push(c);
  }
  const tokens = new Int32Array(PREFIX_BLOCKS * BLOCK_SIZE);
  for (let w = 0; w < workers; w++) {
    const list = held[w]!;
    const lanes = new Uint32Array(list.length * PREFIX_BLOCKS * 2);
    list.forEach((c, k) => {
      prefixTokens(c, tokens);
      lanes.set(kvBlockHashLanes(tokens, BLOCK_SIZE), k * PREFIX_BLOCKS * 2);
    });
    router.onKvSnapshot(names[w]!, { incarnation: w + 1, seq: 0, lanes });
  }
  const candidates: RouteCandidate[] = names.map((name) => ({
    name,
    inflight: 0,
    reportedLoad: 0,
    blockSize: BLOCK_SIZE,
  }));
  // Requests: a prefix some worker holds, then a question of its own.
  const requests: Int32Array[] = [];
  for (let r = 0; r < warmup + decisions; r++) {
    const prompt = new Int32Array(REQUEST_TOKENS);
    prefixTokens(Math.floor(rng() * prefixes), prompt);
    for (let i = PREFIX_BLOCKS * BLOCK_SIZE; i < REQUEST_TOKENS; i++) prompt[i] = Math.floor(rng() * 128_000);
    requests.push(prompt);
  }
  const times = new Float64Array(decisions);
  for (let r = 0; r < requests.length; r++) {
    const requestId = `r${r}`;
    const t0 = performance.now();
    router.route({ requestId, promptIds: requests[r]!, decode: candidates });
    const t1 = performance.now();
    router.complete(requestId);
    if (r >= warmup) times[r - warmup] = (t1 - t0) * 1000;
  }
  const d = distribution(times)!;
  return {
    blocks,
    workers,
    indexBlocks: router.index.blocks,
    p50Us: d.p50,
    p90Us: d.p90,
    p99Us: d.p99,
    meanUs: d.mean,
  };
}

interface IngestResult {
  workers: number;
  blocksPerEvent: number;
  liveBlocks: number;
  events: number;
  seconds: number;
  eventsPerSecond: number;
}

function ingestRate(): IngestResult {
  const workers = 64;
  const liveBatches = Math.floor(100_000 / EVENT_BLOCKS);
  const totalBatches = quick ? 40_000 : 200_000;
  const router = new KvRouter({ debug: noDebug, maxWorkers: workers });
  const names = Array.from({ length: workers }, (_, w) => `decode-${w}`);
  for (let w = 0; w < workers; w++)
    router.onKvSnapshot(names[w]!, { incarnation: 1, seq: 0, lanes: new Uint32Array(0) });
  // Lanes of random blocks (hash outputs are uniform): made before the clock starts.
  const rng = randomLcg(seed / 1000 + 0.0001);
  const lanes = new Uint32Array((totalBatches + liveBatches) * EVENT_BLOCKS * 2);
  for (let i = 0; i < lanes.length; i++) lanes[i] = Math.floor(rng() * 2 ** 32);
  const seq = new Int32Array(workers);
  const batchOf = (b: number, stored: boolean): [string, KvEventBatch] => {
    const w = b % workers;
    return [
      names[w]!,
      {
        incarnation: 1,
        seq: ++seq[w]!,
        kinds: Uint8Array.of(stored ? 1 : 0),
        counts: Uint32Array.of(EVENT_BLOCKS),
        lanes: lanes.subarray(b * EVENT_BLOCKS * 2, (b + 1) * EVENT_BLOCKS * 2),
      },
    ];
  };
  // Fill to the live size, then each step stores a new batch and removes the oldest (same worker, in order).
  for (let b = 0; b < liveBatches; b++) router.onKvEvents(...batchOf(b, true));
  const work: [string, KvEventBatch][] = [];
  for (let b = liveBatches; b < liveBatches + totalBatches; b++) {
    work.push(batchOf(b, true));
    work.push(batchOf(b - liveBatches, false));
  }
  // The removals must follow their worker's numbering: renumber in the order applied.
  seq.fill(0);
  for (let b = 0; b < liveBatches; b++) seq[b % workers]!++;
  for (const [name, batch] of work) batch.seq = ++seq[Number(name.slice(7))]!;
  const t0 = performance.now();
  let applied = 0;
  for (const [name, batch] of work) if (router.onKvEvents(name, batch) === 'applied') applied++;
  const seconds = (performance.now() - t0) / 1000;
  if (applied !== work.length) throw new Error(`only ${applied} of ${work.length} batches applied`);
  const events = work.length * EVENT_BLOCKS;
  return {
    workers,
    blocksPerEvent: EVENT_BLOCKS,
    liveBlocks: router.index.blocks,
    events,
    seconds,
    eventsPerSecond: events / seconds,
  };
}

function chart(rows: DecisionRow[]): ChartSpec {
  const data = rows.flatMap((r) => [
    { blocks: r.blocks, workers: `${r.workers} workers`, us: r.p50Us, stat: 'p50' },
    { blocks: r.blocks, workers: `${r.workers} workers`, us: r.p99Us, stat: 'p99' },
  ]);
  const all = data.map((d) => d.us).concat([TARGET_P99_US]);
  const panel = (stat: string): ChartSpec => ({
    title: `decision latency ${stat}`,
    width: 380,
    height: 260,
    layer: [
      {
        data: { values: data.filter((d) => d.stat === stat) },
        mark: { type: 'line', point: true },
        encoding: {
          x: axisFor('blocks', 'cached blocks in the index', BLOCK_COUNTS, { ticks: BLOCK_COUNTS }),
          y: axisFor('us', 'latency (us)', all, { domain: [Math.min(...all) / 1.5, Math.max(...all) * 1.5] }),
          color: { field: 'workers', type: 'nominal', title: null, scale: { scheme: colourScheme(3) } },
        },
      },
      {
        data: { values: [{ us: TARGET_P99_US }] },
        mark: { type: 'rule', strokeDash: [6, 4], color: '#888' },
        encoding: { y: { field: 'us', type: 'quantitative' } },
      },
    ],
  });
  return panels(
    {
      text: 'KV router: decision latency (one core)',
      subtitle: `request of ${REQUEST_TOKENS} tokens; dashed: p99 target ${TARGET_P99_US} us at 100k blocks x 64 workers`,
    },
    [panel('p50'), panel('p99')],
    2,
    { sharedY: true },
  );
}

async function main(): Promise<void> {
  const started = performance.now();
  const rows: DecisionRow[] = [];
  for (const blocks of BLOCK_COUNTS)
    for (const workers of WORKER_COUNTS) {
      const row = decisionLatency(blocks, workers);
      rows.push(row);
      process.stderr.write(`  ${blocks} blocks x ${workers} workers: p99 ${sig(row.p99Us)} us\n`);
    }
  const ingest = ingestRate();
  const target = rows.find((r) => r.blocks === 100_000 && r.workers === 64)!;
  console.log(
    `bench:router on ${cpus()[0]?.model ?? 'this CPU'} (one core), Node ${process.version}${quick ? ', --quick' : ''}`,
  );
  console.log(
    `decision: route() for a ${REQUEST_TOKENS}-token request (blocks of ${BLOCK_SIZE}, ${PREFIX_BLOCKS} of them a held prefix), ` +
      `${decisions} decisions per point after ${warmup} warm-up`,
  );
  console.log(
    formatTable(
      ['cached blocks', 'workers', 'p50 us', 'p90 us', 'p99 us', 'mean us'],
      rows.map((r) => [String(r.blocks), String(r.workers), sig(r.p50Us), sig(r.p90Us), sig(r.p99Us), sig(r.meanUs)]),
      ['right', 'right', 'right', 'right', 'right', 'right'],
    ),
  );
  console.log(
    `target: p99 <= ${TARGET_P99_US} us at 100k blocks x 64 workers: ${sig(target.p99Us)} us ` +
      `(${target.p99Us <= TARGET_P99_US ? 'met' : 'MISSED'})`,
  );
  console.log(
    `ingest: ${sig(ingest.eventsPerSecond / 1e6)} M events/s (${ingest.events} block events in ${EVENT_BLOCKS}-block ` +
      `events over ${ingest.workers} workers, ~${ingest.liveBlocks} blocks live); target >= 1 M/s: ` +
      `${ingest.eventsPerSecond >= TARGET_INGEST ? 'met' : 'MISSED'}`,
  );
  const report = {
    bench: 'router',
    cpu: cpus()[0]?.model,
    node: process.version,
    quick,
    seconds: (performance.now() - started) / 1000,
    settings: {
      blockSize: BLOCK_SIZE,
      requestTokens: REQUEST_TOKENS,
      prefixBlocks: PREFIX_BLOCKS,
      decisions,
      warmup,
      seed,
    },
    targets: { decisionP99Us: TARGET_P99_US, ingestEventsPerSecond: TARGET_INGEST },
    decisions: rows,
    ingest,
  };
  mkdirSync(dirname(values.out!), { recursive: true });
  writeFileSync(values.out!, `${JSON.stringify(report, null, 2)}\n`);
  console.log(`JSON: ${values.out}`);
  try {
    await writeChart(values.chart!, chart(rows));
    console.log(`chart: ${values.chart}`);
  } catch (error) {
    if (!(error instanceof ChartUnavailableError)) throw error;
    console.log(`no chart: ${error.message}`);
  }
}

await main();

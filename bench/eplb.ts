/**
 * bench:eplb: expert-parallel load balancing (lib/moe) on skewed routing, on the CPU.
 *
 * Routing is simulated: in every layer each token picks top-k distinct experts with Zipf(s) popularity (a random
 * order of experts per layer). The balancer sees a window of steps, places replicas, and the placement is then
 * judged on the next window of steps (tokens routed through the routing table, `routeToSlots`), against the
 * static placement (contiguous experts per rank, no replicas). Imbalance = max / mean tokens per rank, averaged
 * over layers and steps: the busiest rank sets an EP step's time, so 1.5 means the step waits 50 % longer than
 * an even split would. A last section serves requests on the CPU with a dummy MoE whose gates favour a few
 * experts, the balancer fed by the runner's expert load while serving goes on (servingSkewed), and the same on real
 * CPU expert-parallel ranks balancing themselves, the imbalance read from their own counts (ranksSkewed). Also: the time to balance a Qwen3-30B-A3B-sized model (48 layers x 128 experts).
 *
 * --device cuda runs the real-ranks section on the GPU engine instead: 4 expert-parallel CudaLlama ranks sharing one
 * GPU (lib/engine/cuda-experts.ts), the same skewed model and requests, the imbalance read from the ranks' GPU load
 * counters after every step, the step time before and after the first placement applied; its own table, JSON
 * (`gpuRanks`) and chart (imbalance and step time per step).
 *
 *   npm run bench:eplb [-- --quick] [--device cpu|cuda] [--out reports/eplb.json] [--chart reports/eplb.svg] [--seed 1]
 */
import { mkdirSync, writeFileSync } from 'node:fs';
import { cpus } from 'node:os';
import { dirname } from 'node:path';
import { parseArgs } from 'node:util';
import { randomLcg } from 'd3-random';
import { axisFor, ChartUnavailableError, panels, writeChart, type ChartSpec } from '../lib/bench/chart.js';
import { formatTable, sig } from '../lib/bench/table.js';
import { CpuModelRunner } from '../lib/engine/cpu.js';
import { CudaModelRunner } from '../lib/engine/cuda.js';
import { BackendUnavailableError } from '../lib/errors.js';
import { LlmEngine } from '../lib/engine/llm-engine.js';
import type { ModelRunner } from '../lib/engine/runner.js';
import { dummyConfig } from '../lib/engine/model/index.js';
import { skewedMoeWeights } from '../lib/moe/skewed-dummy.js';
import {
  balanceExperts,
  ExpertBalancer,
  ExpertLoadRecorder,
  imbalance,
  rankLoads,
  rankOfSlot,
  routeToSlots,
  staticPlacement,
  type BalanceOptions,
  type EplbPolicy,
  type ExpertPlacement,
} from '../lib/moe/index.js';

const { values } = parseArgs({
  options: {
    quick: { type: 'boolean', default: false },
    out: { type: 'string', default: 'reports/eplb.json' },
    chart: { type: 'string', default: 'reports/eplb.svg' },
    seed: { type: 'string', default: '1' },
    device: { type: 'string', default: 'cpu' },
  },
});
const quick = values.quick!;
const device = values.device!;
if (device !== 'cpu' && device !== 'cuda') {
  console.error(`bench:eplb: --device must be cpu or cuda (got ${device})`);
  process.exit(2);
}
const seed = Number(values.seed);
const LAYERS = quick ? 2 : 4;
const TOKENS_PER_STEP = 256;
const WINDOW_STEPS = quick ? 10 : 40;
const ZIPF = [0.6, 1.0, 1.4];
const REDUNDANT = [0, 1, 2, 4];

interface Shape {
  name: string;
  /** The chart panel's heading. */
  title: string;
  experts: number;
  topK: number;
  ranks: number;
  nodes?: number;
  groups?: number;
}
const SHAPES: Shape[] = [
  {
    name: 'Qwen3-30B-A3B routing (128 experts, top 8) on 8 ranks',
    title: '128 experts (top 8), 8 ranks',
    experts: 128,
    topK: 8,
    ranks: 8,
  },
  {
    name: 'Qwen3-30B-A3B routing on 32 ranks',
    title: '128 experts (top 8), 32 ranks',
    experts: 128,
    topK: 8,
    ranks: 32,
  },
  {
    name: 'Qwen3-30B-A3B routing on 32 ranks, 4 nodes, 8 expert groups (hierarchical)',
    title: '128 experts, 32 ranks, 4 nodes x 8 groups (hierarchical)',
    experts: 128,
    topK: 8,
    ranks: 32,
    nodes: 4,
    groups: 8,
  },
  {
    name: 'Mixtral-8x7B routing (8 experts, top 2) on 4 ranks',
    title: '8 experts (top 2), 4 ranks',
    experts: 8,
    topK: 2,
    ranks: 4,
  },
];

/** Steps of routed expert ids: steps x layers x (tokens * topK), each token's k experts distinct. */
function simulateRouting(experts: number, topK: number, s: number, steps: number, rng: () => number): Int32Array[][] {
  const layerCdf = Array.from({ length: LAYERS }, () => {
    const order = Array.from({ length: experts }, (_, i) => i);
    for (let i = experts - 1; i > 0; i--) {
      const j = Math.floor(rng() * (i + 1));
      [order[i], order[j]] = [order[j]!, order[i]!];
    }
    const weight = new Float64Array(experts);
    order.forEach((e, rank) => (weight[e] = 1 / Math.pow(rank + 1, s)));
    const total = weight.reduce((a, b) => a + b, 0);
    let acc = 0;
    return Float64Array.from(weight, (w) => (acc += w / total));
  });
  const draw = (cdf: Float64Array) => {
    const u = rng();
    let lo = 0;
    let hi = cdf.length - 1;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (cdf[mid]! < u) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  };
  return Array.from({ length: steps }, () =>
    layerCdf.map((cdf) => {
      const ids = new Int32Array(TOKENS_PER_STEP * topK);
      for (let t = 0; t < TOKENS_PER_STEP; t++)
        for (let j = 0; j < topK; j++) {
          let e: number;
          do e = draw(cdf);
          while (ids.subarray(t * topK, t * topK + j).includes(e));
          ids[t * topK + j] = e;
        }
      return ids;
    }),
  );
}

/** Tokens per expert per layer, summed over steps. */
function loadsOf(steps: Int32Array[][], experts: number): Float64Array[] {
  const out = Array.from({ length: LAYERS }, () => new Float64Array(experts));
  for (const step of steps) step.forEach((ids, l) => ids.forEach((e) => out[l]![e]!++));
  return out;
}

/** Mean over steps and layers of max/mean tokens per rank, tokens sent through the placement's routing table. */
function measuredImbalance(placement: ExpertPlacement, steps: Int32Array[][]): number {
  let sum = 0;
  let n = 0;
  for (const step of steps)
    step.forEach((ids, l) => {
      const perRank = new Float64Array(placement.numRanks);
      for (const slot of routeToSlots(placement, l, ids)) perRank[rankOfSlot(placement, slot)]!++;
      sum += imbalance(perRank);
      n++;
    });
  return sum / n;
}

interface Row {
  shape: string;
  experts: number;
  topK: number;
  ranks: number;
  nodes: number;
  zipf: number;
  redundantSlotsPerRank: number;
  /** Static placement, on the evaluation window. */
  imbalanceStatic: number;
  /** EPLB placement fit on the first window, judged on the next one. */
  imbalanceBalanced: number;
  /** EPLB's own estimate on the window it was fit on (loads spread evenly over replicas). */
  imbalanceFitted: number;
  balanceMs: number;
}

function placementRows(): Row[] {
  const rows: Row[] = [];
  for (const shape of SHAPES)
    for (const s of ZIPF) {
      const rng = randomLcg(((seed * 7919 + shape.experts * 31 + shape.ranks + s * 1000) % 1000) / 1000);
      const steps = simulateRouting(shape.experts, shape.topK, s, 2 * WINDOW_STEPS, rng);
      const fit = steps.slice(0, WINDOW_STEPS);
      const judge = steps.slice(WINDOW_STEPS);
      const loads = loadsOf(fit, shape.experts);
      const before = measuredImbalance(staticPlacement(LAYERS, shape.experts, shape.ranks), judge);
      for (const redundant of REDUNDANT) {
        const options: BalanceOptions = {
          numRanks: shape.ranks,
          redundantSlotsPerRank: redundant,
          numNodes: shape.nodes,
          numExpertGroups: shape.groups,
        };
        const t0 = performance.now();
        const result = balanceExperts(loads, options);
        const balanceMs = performance.now() - t0;
        rows.push({
          shape: shape.name,
          experts: shape.experts,
          topK: shape.topK,
          ranks: shape.ranks,
          nodes: shape.nodes ?? 1,
          zipf: s,
          redundantSlotsPerRank: redundant,
          imbalanceStatic: before,
          imbalanceBalanced: measuredImbalance(result.placement, judge),
          imbalanceFitted: result.imbalanceAfter.reduce((a, b) => a + b, 0) / LAYERS,
          balanceMs,
        });
      }
      process.stderr.write(`  ${shape.name}, zipf ${s}: done\n`);
    }
  return rows;
}

/** Time to balance a Qwen3-30B-A3B-sized model: 48 layers x 128 experts on 32 ranks, 1 redundant slot each. */
function fullModelBalanceMs(): number {
  const rng = randomLcg(0.5);
  const loads = Array.from({ length: 48 }, () => Float64Array.from({ length: 128 }, () => Math.floor(rng() * 1e5)));
  balanceExperts(loads, { numRanks: 32, redundantSlotsPerRank: 1 });
  const runs = quick ? 3 : 10;
  const t0 = performance.now();
  for (let i = 0; i < runs; i++) balanceExperts(loads, { numRanks: 32, redundantSlotsPerRank: 1 });
  return (performance.now() - t0) / runs;
}

interface ServingResult {
  model: string;
  ranks: number;
  policy: EplbPolicy;
  requests: number;
  steps: number;
  /** Mean over layers of max/mean tokens per rank, each step under the placement in force during it. */
  timeline: { step: number; imbalance: number }[];
  /** Steps served before the first placement was applied, and their mean imbalance; then those after. */
  stepsBefore: number;
  imbalanceBefore: number;
  imbalanceAfter: number;
  decisions: { step: number; gain: number; applied: boolean; moves: number }[];
}

/** Serves the benchmark's requests (random 24-token prompts, greedy) through LlmEngine on `runner`; returns how many. */
async function serveSkewed(runner: ModelRunner, quick: boolean, rng: () => number): Promise<number> {
  const engine = new LlmEngine(runner);
  const requests = quick ? 4 : 12;
  try {
    await Promise.all(
      Array.from({ length: requests }, () =>
        engine
          .addRequest({
            promptTokenIds: Array.from({ length: 24 }, () => Math.floor(rng() * 256)),
            sampling: { temperature: 0, maxTokens: quick ? 16 : 40 },
          })
          .result(),
      ),
    );
  } finally {
    await engine.dispose();
  }
  return requests;
}

/**
 * dummy:tiny-moe with gates that favour a few experts (a shared input direction, and router weights on it
 * falling with Zipf(1) over a random order of experts per layer) served through LlmEngine on the CPU; its
 * expert load feeds the balancer while requests run, and each step's imbalance is measured under the
 * placement in force.
 */
async function servingSkewed(): Promise<ServingResult> {
  const config = dummyConfig('tiny-moe');
  const { numExperts } = config.moe!;
  const rng = randomLcg(seed / 1000 + 0.0007);
  const weights = skewedMoeWeights(config, seed, rng);
  const policy: EplbPolicy = { windowSteps: 4, periodSteps: 4, redundantSlotsPerRank: 1, minImbalanceGain: 0.05 };
  const ranks = 4;
  const balancer = new ExpertBalancer(config.numLayers, numExperts, ranks, policy);
  const timeline: { step: number; imbalance: number }[] = [];
  const runner = await CpuModelRunner.create({ config, numBlocks: 256, blockSize: 16, threads: 2, weights });
  const recorder = new ExpertLoadRecorder(runner, config.numLayers, numExperts, policy.windowSteps, (load) => {
    let sum = 0;
    for (let l = 0; l < config.numLayers; l++)
      sum += imbalance(rankLoads(balancer.placement, l, load.subarray(l * numExperts, (l + 1) * numExperts)));
    timeline.push({ step: timeline.length, imbalance: sum / config.numLayers });
    balancer.step(load);
  });
  const requests = await serveSkewed(recorder, quick, rng);
  const firstApplied = balancer.decisions.find((d) => d.applied)?.step ?? timeline.length;
  const mean = (xs: { imbalance: number }[]) => xs.reduce((a, b) => a + b.imbalance, 0) / Math.max(1, xs.length);
  return {
    model: 'dummy:tiny-moe with skewed gates (8 experts, top 2)',
    ranks,
    policy,
    requests,
    steps: timeline.length,
    timeline,
    stepsBefore: firstApplied,
    imbalanceBefore: mean(timeline.slice(0, firstApplied)),
    imbalanceAfter: mean(timeline.slice(firstApplied)),
    decisions: balancer.decisions.map((d) => ({
      step: d.step,
      gain: d.gain,
      applied: d.applied,
      moves: d.moves.length,
    })),
  };
}

interface CpuRanksResult {
  model: string;
  ranks: number;
  policy: EplbPolicy;
  requests: number;
  steps: number;
  /** Each step: max / mean of the (token, choice) pairs each EP rank ran (the runner's own counts), mean over layers. */
  timeline: { step: number; imbalance: number; ms: number }[];
  stepsBefore: number;
  imbalanceBefore: number;
  imbalanceAfter: number;
  /** Mean wall time of a step (its pass, and the placement applied after it if any) before and after. */
  stepMsBefore: number;
  stepMsAfter: number;
  decisions: { step: number; gain: number; applied: boolean; moves: number }[];
}

/**
 * The same skewed model and requests on real expert-parallel ranks (not simulated): a runner with 4 EP ranks and the
 * `eplb` option balances itself between steps (copying expert weights between the ranks' slots); the imbalance is
 * read from the runner's own per-rank counts (`takeRankLoad`) after every step. `cpu`: CPU ranks (threads); `cuda`:
 * GPU ranks sharing one device.
 */
async function ranksSkewed(on: 'cpu' | 'cuda'): Promise<CpuRanksResult> {
  const config = dummyConfig('tiny-moe');
  const rng = randomLcg(seed / 1000 + 0.0007);
  const weights = skewedMoeWeights(config, seed, rng);
  const policy: EplbPolicy = { windowSteps: 4, periodSteps: 4, redundantSlotsPerRank: 1, minImbalanceGain: 0.05 };
  const ranks = 4;
  const options = { config, numBlocks: 256, blockSize: 16, weights, eplb: policy };
  const runner =
    on === 'cpu'
      ? await CpuModelRunner.create({ ...options, threads: ranks, parallel: { ep: ranks } })
      : await CudaModelRunner.create({ ...options, parallel: { tp: 1, ep: ranks } });
  const balancer = runner.expertBalancer!;
  const timeline: { step: number; imbalance: number; ms: number }[] = [];
  const observed: ModelRunner = {
    vocabSize: runner.vocabSize,
    blockSize: runner.blockSize,
    numBlocks: runner.numBlocks,
    maxPositions: runner.maxPositions,
    forward: async (batch) => {
      const t0 = performance.now();
      const logits = await runner.forward(batch);
      const ms = performance.now() - t0;
      const load = runner.takeRankLoad();
      let sum = 0;
      for (let l = 0; l < config.numLayers; l++) sum += imbalance(load.subarray(l * ranks, (l + 1) * ranks));
      timeline.push({ step: timeline.length, imbalance: sum / config.numLayers, ms });
      return logits;
    },
    dispose: () => runner.dispose(),
  };
  const requests = await serveSkewed(observed, quick, rng);
  if (runner.eplbError) throw runner.eplbError;
  // A decision at step n is applied after step n - 1 ran: steps n.. run on it.
  const firstApplied = balancer.decisions.find((d) => d.applied)?.step ?? timeline.length;
  const mean = (xs: number[]) => xs.reduce((a, b) => a + b, 0) / Math.max(1, xs.length);
  const before = timeline.slice(0, firstApplied);
  const after = timeline.slice(firstApplied);
  return {
    model: 'dummy:tiny-moe with skewed gates (8 experts, top 2)',
    ranks,
    policy,
    requests,
    steps: timeline.length,
    timeline,
    stepsBefore: firstApplied,
    imbalanceBefore: mean(before.map((t) => t.imbalance)),
    imbalanceAfter: mean(after.map((t) => t.imbalance)),
    stepMsBefore: mean(before.map((t) => t.ms)),
    stepMsAfter: mean(after.map((t) => t.ms)),
    decisions: balancer.decisions.map((d) => ({
      step: d.step,
      gain: d.gain,
      applied: d.applied,
      moves: d.moves.length,
    })),
  };
}

function chart(rows: Row[], serving: ServingResult): ChartSpec {
  const data = rows.flatMap((r) => [
    {
      shape: r.shape,
      redundant: r.redundantSlotsPerRank,
      imbalance: r.imbalanceStatic,
      series: `Zipf ${r.zipf}, static`,
    },
    {
      shape: r.shape,
      redundant: r.redundantSlotsPerRank,
      imbalance: r.imbalanceBalanced,
      series: `Zipf ${r.zipf}, EPLB`,
    },
  ]);
  const series = [...new Set(data.map((d) => d.series))].sort();
  // One colour per Zipf exponent; static dashed, EPLB solid.
  const palette = ['#4c78a8', '#f58518', '#e45756'];
  const colours: Record<string, string> = Object.fromEntries(ZIPF.map((s, i) => [`Zipf ${s}`, palette[i]!]));
  const all = data.map((d) => d.imbalance);
  const specs = SHAPES.map((shape): ChartSpec => ({
    title: shape.title,
    width: 380,
    height: 240,
    data: { values: data.filter((d) => d.shape === shape.name) },
    mark: { type: 'line', point: true },
    encoding: {
      x: axisFor('redundant', 'redundant expert slots per rank', REDUNDANT, { ticks: REDUNDANT, zero: true }),
      y: axisFor('imbalance', 'imbalance (max / mean tokens per rank)', all, {
        domain: [1, Math.max(...all) * 1.05],
      }),
      color: {
        field: 'series',
        type: 'nominal',
        title: null,
        sort: series,
        scale: { domain: series, range: series.map((name) => colours[name.split(',')[0]!]!) },
        legend: { symbolType: 'stroke', symbolSize: 700, columns: 3 },
      },
      strokeDash: {
        field: 'series',
        type: 'nominal',
        title: null,
        sort: series,
        scale: { domain: series, range: series.map((name) => (name.endsWith('static') ? [6, 4] : [1, 0])) },
      },
    },
  }));
  const steps = serving.timeline.map((t) => t.step);
  specs.push({
    title: `serving ${serving.model}, ${serving.ranks} ranks`,
    width: 380,
    height: 240,
    layer: [
      {
        data: { values: serving.timeline },
        mark: { type: 'line', point: { color: '#222' }, color: '#222' },
        encoding: {
          x: axisFor('step', 'engine step', steps, { zero: true }),
          y: axisFor('imbalance', 'imbalance (max / mean tokens per rank)', all, {
            domain: [1, Math.max(...all) * 1.05],
          }),
        },
      },
      {
        data: { values: serving.decisions.filter((d) => d.applied) },
        mark: { type: 'rule', strokeDash: [6, 4], color: '#888' },
        encoding: { x: { field: 'step', type: 'quantitative' } },
      },
    ],
  });
  return panels(
    {
      text: 'EPLB: imbalance on skewed routing, before (static, dashed) and after balancing',
      subtitle: [
        `Zipf routing, ${TOKENS_PER_STEP} tokens a step; fit on ${WINDOW_STEPS} steps, judged on the next ${WINDOW_STEPS}`,
        'last panel: each serving step under the placement in force; grey dashes: a new placement applied',
      ],
    },
    specs,
    2,
    { sharedY: true },
  );
}

async function main(): Promise<void> {
  const started = performance.now();
  const rows = placementRows();
  const fullMs = fullModelBalanceMs();
  const serving = await servingSkewed();
  const cpuRanks = await ranksSkewed('cpu');
  console.log(`bench:eplb on ${cpus()[0]?.model ?? 'this CPU'}, Node ${process.version}${quick ? ', --quick' : ''}`);
  console.log(
    `routing: Zipf over experts (random order per layer), ${TOKENS_PER_STEP} tokens a step, ${LAYERS} layers; ` +
      `placement fit on ${WINDOW_STEPS} steps, imbalance measured on the next ${WINDOW_STEPS} (mean over steps and layers)`,
  );
  console.log(
    formatTable(
      ['shape', 'zipf s', 'redundant/rank', 'static', 'EPLB', 'EPLB (fit window)', 'balance ms'],
      rows.map((r) => [
        r.shape,
        String(r.zipf),
        String(r.redundantSlotsPerRank),
        sig(r.imbalanceStatic),
        sig(r.imbalanceBalanced),
        sig(r.imbalanceFitted),
        sig(r.balanceMs),
      ]),
      ['left', 'right', 'right', 'right', 'right', 'right', 'right'],
    ),
  );
  console.log(`balancing 48 layers x 128 experts over 32 ranks (1 redundant slot each): ${sig(fullMs)} ms`);
  console.log(
    `serving ${serving.model} through LlmEngine on the CPU, ${serving.requests} requests, ${serving.steps} steps; ` +
      `balancer over ${serving.ranks} ranks (window ${serving.policy.windowSteps}, period ${serving.policy.periodSteps}, ` +
      `${serving.policy.redundantSlotsPerRank} redundant slot per rank, minimum gain ${serving.policy.minImbalanceGain}):`,
  );
  console.log(
    `  imbalance ${sig(serving.imbalanceBefore)} over the ${serving.stepsBefore} steps before the first placement applied, ` +
      `${sig(serving.imbalanceAfter)} over the ${serving.steps - serving.stepsBefore} after; decisions: ` +
      serving.decisions
        .map((d) => `step ${d.step} gain ${sig(d.gain)} ${d.applied ? `applied (${d.moves} expert copies)` : 'kept'}`)
        .join(', '),
  );
  console.log(
    `the same on ${cpuRanks.ranks} CPU expert-parallel ranks with the runner's eplb option (measured per-rank pairs, ` +
      `not simulated), ${cpuRanks.requests} requests, ${cpuRanks.steps} steps: imbalance ` +
      `${sig(cpuRanks.imbalanceBefore)} over the ${cpuRanks.stepsBefore} steps before the first placement applied, ` +
      `${sig(cpuRanks.imbalanceAfter)} over the ${cpuRanks.steps - cpuRanks.stepsBefore} after; step ` +
      `${sig(cpuRanks.stepMsBefore)} ms before, ${sig(cpuRanks.stepMsAfter)} ms after; decisions: ` +
      cpuRanks.decisions
        .map((d) => `step ${d.step} gain ${sig(d.gain)} ${d.applied ? `applied (${d.moves} expert copies)` : 'kept'}`)
        .join(', '),
  );
  const report = {
    bench: 'eplb',
    cpu: cpus()[0]?.model,
    node: process.version,
    quick,
    seconds: (performance.now() - started) / 1000,
    settings: { layers: LAYERS, tokensPerStep: TOKENS_PER_STEP, windowSteps: WINDOW_STEPS, zipf: ZIPF, seed },
    placement: rows,
    fullModelBalanceMs: fullMs,
    serving,
    cpuRanks,
  };
  mkdirSync(dirname(values.out!), { recursive: true });
  writeFileSync(values.out!, `${JSON.stringify(report, null, 2)}\n`);
  console.log(`JSON: ${values.out}`);
  try {
    await writeChart(values.chart!, chart(rows, serving));
    console.log(`chart: ${values.chart}`);
  } catch (error) {
    if (!(error instanceof ChartUnavailableError)) throw error;
    console.log(`no chart: ${error.message}`);
  }
}

/** --device cuda: the real-ranks section on GPU ranks sharing one device, with its own table, JSON and chart. */
async function mainCuda(): Promise<void> {
  const started = performance.now();
  let gpuRanks: CpuRanksResult;
  try {
    gpuRanks = await ranksSkewed('cuda');
  } catch (error) {
    // No GPU, no kernels or no cuBLAS here: say which, and exit without a report.
    if (!(error instanceof BackendUnavailableError)) throw error;
    console.error(`bench:eplb --device cuda: ${error.message}`);
    process.exit(1);
  }
  console.log(`bench:eplb --device cuda, Node ${process.version}${quick ? ', --quick' : ''}`);
  console.log(
    `serving ${gpuRanks.model} on ${gpuRanks.ranks} GPU expert-parallel ranks sharing one device (eplb: window ` +
      `${gpuRanks.policy.windowSteps}, period ${gpuRanks.policy.periodSteps}, ${gpuRanks.policy.redundantSlotsPerRank} ` +
      `redundant slot per rank, minimum gain ${gpuRanks.policy.minImbalanceGain}), ${gpuRanks.requests} requests, ` +
      `${gpuRanks.steps} steps; imbalance = max / mean (token, choice) pairs per rank from the ranks' GPU counters:`,
  );
  console.log(
    formatTable(
      ['', 'steps', 'imbalance', 'step ms'],
      [
        [
          'before the first placement',
          String(gpuRanks.stepsBefore),
          sig(gpuRanks.imbalanceBefore),
          sig(gpuRanks.stepMsBefore),
        ],
        [
          'after',
          String(gpuRanks.steps - gpuRanks.stepsBefore),
          sig(gpuRanks.imbalanceAfter),
          sig(gpuRanks.stepMsAfter),
        ],
      ],
      ['left', 'right', 'right', 'right'],
    ),
  );
  console.log(
    'decisions: ' +
      gpuRanks.decisions
        .map((d) => `step ${d.step} gain ${sig(d.gain)} ${d.applied ? `applied (${d.moves} expert copies)` : 'kept'}`)
        .join(', '),
  );
  const report = {
    bench: 'eplb',
    device: 'cuda',
    node: process.version,
    quick,
    seconds: (performance.now() - started) / 1000,
    settings: { seed },
    gpuRanks,
  };
  mkdirSync(dirname(values.out!), { recursive: true });
  writeFileSync(values.out!, `${JSON.stringify(report, null, 2)}\n`);
  console.log(`JSON: ${values.out}`);
  try {
    await writeChart(values.chart!, ranksChart(gpuRanks, 'GPU'));
    console.log(`chart: ${values.chart}`);
  } catch (error) {
    if (!(error instanceof ChartUnavailableError)) throw error;
    console.log(`no chart: ${error.message}`);
  }
}

/** Real ranks balancing themselves: imbalance and step time per step, a rule where a placement was applied. */
function ranksChart(result: CpuRanksResult, where: string): ChartSpec {
  const steps = result.timeline.map((t) => t.step);
  const applied = result.decisions.filter((d) => d.applied);
  const panel = (field: 'imbalance' | 'ms', title: string): ChartSpec => ({
    title,
    width: 380,
    height: 240,
    layer: [
      {
        data: { values: result.timeline },
        mark: { type: 'line', point: { color: '#222' }, color: '#222' },
        encoding: {
          x: axisFor('step', 'engine step', steps, { zero: true }),
          y: axisFor(
            field,
            field === 'ms' ? 'step time (ms)' : 'imbalance (max / mean pairs per rank)',
            result.timeline.map((t) => t[field]),
            field === 'ms'
              ? { zero: true }
              : { domain: [1, Math.max(...result.timeline.map((t) => t.imbalance)) * 1.05] },
          ),
        },
      },
      {
        data: { values: applied },
        mark: { type: 'rule', strokeDash: [6, 4], color: '#888' },
        encoding: { x: { field: 'step', type: 'quantitative' } },
      },
    ],
  });
  return panels(
    {
      text: `EPLB on ${result.ranks} ${where} expert-parallel ranks: ${result.model}`,
      subtitle: ['grey dashes: a new placement applied (expert weights copied between the ranks, tables switched)'],
    },
    [panel('imbalance', 'imbalance per step'), panel('ms', 'step time')],
    2,
  );
}

await (device === 'cuda' ? mainCuda() : main());

/**
 * Online expert load balancing on CPU EP ranks (issue 28): ranks with redundant expert slots route through a
 * placement table; applying a placement copies the expert weights between the ranks' slots and switches the table
 * between passes. Logits stay those of one rank bit for bit whatever the placement (replicas are copies, the
 * combine sums in expert order), requests served meanwhile lose nothing, bad placements are refused with a typed
 * error and change nothing, and the runner's own per-rank counts show the imbalance fall after balancing.
 */
import { isDeepStrictEqual as deepEqual } from 'node:util';
import { randomLcg } from 'd3-random';
import { describe, expect, it } from 'vitest';
import { CpuModelRunner, nativeModelFields, type NamedTensor } from '../../lib/engine/cpu.js';
import { weightManifest } from '../../lib/engine/model/manifest.js';
import { forwardArgs } from '../../lib/engine/runner.js';
import { loadBinding } from '../../lib/native/binding.js';
import { LlmEngine } from '../../lib/engine/llm-engine.js';
import { dummyConfig } from '../../lib/engine/model/index.js';
import type { ForwardBatch, ModelRunner } from '../../lib/engine/runner.js';
import { BadArgumentError } from '../../lib/errors.js';
import {
  alignPlacement,
  balanceExperts,
  imbalance,
  layerPlacementFromSlots,
  staticPlacement,
  type EplbPolicy,
  type ExpertPlacement,
} from '../../lib/moe/index.js';
import { skewedMoeWeights } from '../../lib/moe/skewed-dummy.js';
import { forwardBatch, logitsRow, type SequenceStep } from '../helpers/forward-batch.js';

// dummy:tiny-moe (2 layers, 8 experts) routing each token to 4 experts: with three or more outputs per token the
// order of the combine's additions shows in the bits (with two, a + b = b + a).
const config = { ...dummyConfig('tiny-moe'), moe: { ...dummyConfig('tiny-moe').moe!, topK: 4 } };
const E = config.moe!.numExperts;
const L = config.numLayers;
const V = config.vocabSize;
const weights: NamedTensor[] = skewedMoeWeights(config, 3, randomLcg(0.37));
/** Redundant slots but no automatic balancing (a period no test reaches). */
const manual = (redundantSlotsPerRank: number): EplbPolicy => ({
  redundantSlotsPerRank,
  windowSteps: 1,
  periodSteps: 1e9,
  minImbalanceGain: 0,
});

const runnerFor = (ep: number, eplb?: EplbPolicy) =>
  CpuModelRunner.create({
    config,
    numBlocks: 64,
    blockSize: 4,
    threads: Math.max(1, ep),
    weights,
    parallel: { ep },
    ...(eplb ? { eplb } : {}),
  });

const tokensOf = (n: number, salt: number) => Array.from({ length: n }, (_, i) => (i * 37 + salt * 11 + 5) % V);
const argmax = (row: Float32Array) => row.reduce((best, v, i) => (v > row[best]! ? i : best), 0);

/**
 * Every slot rewritten: the experts in reverse order, rotated by layer, then the redundant slots holding replicas
 * of a few experts (a rank may hold an expert twice); experts move between ranks and some slots trade experts.
 */
function shuffled(ranks: number, slotsPerRank: number): ExpertPlacement {
  const layers = Array.from({ length: L }, (_, l) => {
    const list = Array.from({ length: E }, (_, i) => (E - 1 - i + l) % E);
    for (let i = list.length; i < ranks * slotsPerRank; i++) list.push((l * 3 + i) % E);
    return layerPlacementFromSlots(Int32Array.from(list), E);
  });
  return { numExperts: E, numRanks: ranks, slotsPerRank, layers };
}

/**
 * Prefill of three sequences, then decode steps feeding back each one's greedy token; `between(step)` runs after
 * each step (awaited) and may apply a placement.
 */
async function schedule(runner: CpuModelRunner, between?: (step: number) => Promise<void>) {
  const prompts = [tokensOf(9, 1), tokensOf(6, 2), tokensOf(3, 3)];
  const blocks = [
    [0, 1, 2, 3, 4],
    [7, 6, 5, 8],
    [10, 9, 11, 12],
  ];
  const lengths = prompts.map((p) => p.length);
  const logits: Float32Array[] = [];
  const tokens: number[][] = [[], [], []];
  let out = await runner.forward(forwardBatch(prompts.map((p, i) => ({ blocks: blocks[i]!, start: 0, tokens: p }))));
  logits.push(out);
  for (let step = 1; step <= 6; step++) {
    await between?.(step);
    const next = [0, 1, 2].map((i) => argmax(logitsRow(out, V, i)));
    next.forEach((t, i) => tokens[i]!.push(t));
    out = await runner.forward(
      forwardBatch(
        next.map((t, i) => ({ blocks: blocks[i]!, start: lengths[i]!++, tokens: [t] })),
        5,
      ),
    );
    logits.push(out);
  }
  return { logits, tokens };
}

/** Mean over layers of max / mean of per-rank counts (numLayers x ranks, layer-major). */
function rankImbalance(rankLoad: Float64Array, ranks: number): number {
  let sum = 0;
  for (let l = 0; l < L; l++) sum += imbalance(rankLoad.subarray(l * ranks, (l + 1) * ranks));
  return sum / L;
}

/**
 * The pairs each rank runs when `expertLoad` pairs go through `placement` after `routedBefore` pairs went through it
 * (per layer and expert): replica i of n takes the pairs j = i mod n, j counted from the placement's start.
 */
function expectedRankLoad(
  placement: ExpertPlacement,
  expertLoad: Float64Array,
  routedBefore?: Float64Array,
): Float64Array {
  const upTo = (j: number, i: number, n: number) => Math.floor((j - i + n - 1) / n); // #{j' < j : j' = i mod n}
  const out = new Float64Array(L * placement.numRanks);
  placement.layers.forEach((lp, l) =>
    lp.expertToSlots.forEach((slots, e) =>
      slots.forEach((slot, i) => {
        const n = slots.length;
        const b = routedBefore?.[l * E + e] ?? 0;
        const c = expertLoad[l * E + e]!;
        out[l * placement.numRanks + Math.floor(slot / placement.slotsPerRank)]! += upTo(b + c, i, n) - upTo(b, i, n);
      }),
    ),
  );
  return out;
}

const single = (async () => {
  const runner = await runnerFor(1);
  try {
    return await schedule(runner);
  } finally {
    await runner.dispose();
  }
})();

describe('CPU expert-parallel ranks with redundant slots and online placement', () => {
  for (const [ep, redundant] of [
    [2, 1],
    [4, 1],
    [4, 2],
  ] as const)
    it(`ep ${ep}, ${redundant} redundant slot(s) per rank: logits and greedy tokens equal one rank's bit for bit, before and after placements`, async () => {
      const reference = await single;
      await using runner = await runnerFor(ep, manual(redundant));
      const S = E / ep + redundant;
      // The initial placement is lib/moe's static one, its replicas filled from their owners.
      expect(runner.expertPlacement).toEqual(staticPlacement(L, E, ep, redundant));
      const changes: { slotsCopied: number; crossRankCopies: number; bytes: number }[] = [];
      let rewritten = 0;
      const got = await schedule(runner, async (step) => {
        if (step === 2) {
          const placement = shuffled(ep, S);
          const now = runner.expertPlacement;
          placement.layers.forEach((lp, l) =>
            lp.slotToExpert.forEach((e, s) => (rewritten += e === now.layers[l]!.slotToExpert[s] ? 0 : 1)),
          );
          changes.push(await runner.applyExpertPlacement(placement));
          expect(runner.expertPlacement).toEqual(placement);
        }
        if (step === 4) {
          // The balancer's placement for the load measured so far (a skewed one: a few experts take most tokens).
          const load = runner.takeExpertLoad();
          const rows = Array.from({ length: L }, (_, l) => load.subarray(l * E, (l + 1) * E));
          const result = balanceExperts(rows, { numRanks: ep, redundantSlotsPerRank: redundant });
          const placement = alignPlacement(runner.expertPlacement, result.placement);
          changes.push(await runner.applyExpertPlacement(placement));
          expect(runner.expertPlacement).toEqual(placement);
        }
      });
      expect(got.tokens).toEqual(reference.tokens);
      expect(got.logits.length).toBe(reference.logits.length);
      got.logits.forEach((l, i) => expect(Array.from(l), `step ${i}`).toEqual(Array.from(reference.logits[i]!)));
      // Every slot whose expert changed was rewritten, many from another rank.
      expect(rewritten).toBeGreaterThan(L * ep * S - 2 * L);
      expect(changes[0]!.slotsCopied).toBe(rewritten);
      expect(changes[0]!.crossRankCopies).toBeGreaterThan(0);
      const expertBytes =
        (2 * config.moe!.intermediateSize * config.hiddenSize + config.hiddenSize * config.moe!.intermediateSize) * 4;
      expect(changes[0]!.bytes).toBe(changes[0]!.slotsCopied * expertBytes);
    });

  it('a placement applied between two queued passes: the first runs on the old table, the second on the new', async () => {
    await using runner = await runnerFor(4, manual(1));
    const before = runner.expertPlacement;
    const after = shuffled(4, 3);
    const prefill = (blocks: number[]): SequenceStep[] => [{ blocks, start: 0, tokens: tokensOf(12, 5) }];
    // Not awaited: the apply is queued behind the first pass and ahead of the second.
    const first = runner.forward(forwardBatch(prefill([0, 1, 2])));
    const applied = runner.applyExpertPlacement(after);
    const second = runner.forward(forwardBatch(prefill([3, 4, 5])));
    const [a, , b] = await Promise.all([first, applied, second]);
    expect(Array.from(b)).toEqual(Array.from(a));
    // The per-rank counts are the first pass's under the old table plus the second's under the new one.
    const expertLoad = runner.takeExpertLoad().map((n) => n / 2); // two identical passes
    const rankLoad = runner.takeRankLoad();
    const expected = expectedRankLoad(before, expertLoad);
    expectedRankLoad(after, expertLoad).forEach((n, i) => (expected[i]! += n));
    expect(Array.from(rankLoad)).toEqual(Array.from(expected));
  });

  it("an expert's replicas take its pairs in turn across passes, so one-token steps reach every replica", async () => {
    await using runner = await runnerFor(4, manual(1));
    const placement = shuffled(4, 3);
    await runner.applyExpertPlacement(placement);
    const pass = (i: number) => runner.forward(forwardBatch([{ blocks: [i], start: 0, tokens: [7] }]));
    const first = await pass(0);
    const load = runner.takeExpertLoad(); // one token: topK experts, one pair each, per layer
    const perPass = [runner.takeRankLoad()];
    expect(Array.from(perPass[0]!)).toEqual(Array.from(expectedRankLoad(placement, load)));
    for (let i = 1; i <= 3; i++) {
      expect(Array.from(await pass(i))).toEqual(Array.from(first));
      expect(runner.takeExpertLoad()).toEqual(load);
      perPass.push(runner.takeRankLoad());
      const before = load.map((n) => n * i);
      expect(Array.from(perPass[i]!), `pass ${i}`).toEqual(Array.from(expectedRankLoad(placement, load, before)));
    }
    // The same token, yet the ranks that ran it change from pass to pass.
    expect(perPass.some((p) => !deepEqual(p, perPass[0]))).toBe(true);
  });

  it('bad placements are refused with BadArgumentError before anything changes, and the runner keeps serving', async () => {
    const reference = await single;
    await using runner = await runnerFor(2, manual(1));
    const placement = runner.expertPlacement;
    // Layer 0's slot table as given (expertToSlots is the runner's to derive; it reads slotToExpert only).
    const withLayer0 = (row: number[]): ExpertPlacement => ({
      ...placement,
      layers: [
        { slotToExpert: Int32Array.from(row), expertToSlots: [], replicaCount: new Int32Array(E) },
        placement.layers[1]!,
      ],
    });
    const cases: [ExpertPlacement, RegExp][] = [
      [staticPlacement(L, E, 2, 0), /ranks x 5 slots; the placement is 2 x 8 on 2 x 4/],
      [staticPlacement(L, E, 4, 1), /the placement is 2 x 8 on 4 x 3/],
      [{ ...placement, layers: [placement.layers[0]!] }, /the placement is 1 x 8/],
      // expert 7 has no slot (expert 0 twice instead)
      [withLayer0([0, 1, 2, 3, 4, 5, 6, 0, 0, 1]), /layer 0 of the expert placement leaves expert 7 without a replica/],
      [withLayer0([0, 1, 2, 3, 4, 5, 6, 7, 8, 1]), /layer 0 slot 8 holds expert 8; the model has experts 0..7/],
      [withLayer0([0, 1, 2, 3, -1, 5, 6, 7, 0, 1]), /layer 0 slot 4 holds expert -1/],
      [
        { ...placement, layers: [{ ...placement.layers[0]!, slotToExpert: new Int32Array(3) }, placement.layers[1]!] },
        /layer 0 has 3 slots; the runner has 10/,
      ],
    ];
    for (const [bad, message] of cases) {
      const error = await runner.applyExpertPlacement(bad).catch((e: unknown) => e);
      expect(error, String(message)).toBeInstanceOf(BadArgumentError);
      expect((error as BadArgumentError).code).toBe('TANDEM_BAD_ARGUMENT');
      expect((error as Error).message).toMatch(message);
      expect(runner.expertPlacement).toEqual(placement);
    }
    const got = await schedule(runner);
    got.logits.forEach((l, i) => expect(Array.from(l), `step ${i}`).toEqual(Array.from(reference.logits[i]!)));

    // Without expert parallelism there is no placement to apply; eplb needs ep > 1 and a sound policy.
    await using one = await runnerFor(1);
    await expect(one.applyExpertPlacement(placement)).rejects.toThrow(
      /needs a mixture-of-experts model with expert parallelism/,
    );
    await expect(runnerFor(1, manual(1))).rejects.toThrow(BadArgumentError);
    await expect(runnerFor(2, { ...manual(1), minImbalanceGain: 2 })).rejects.toThrow(
      /minImbalanceGain must be in \[0, 1\)/,
    );
    await expect(runnerFor(2, manual(9))).rejects.toThrow(/redundantSlotsPerRank is at most the model's 8 experts/);
  });

  it('the native layer guards its slots itself: redundant slots need ep > 1, a placement needs every weight, expert weights cannot be set once slots moved', async () => {
    const { binding } = loadBinding();
    const make = (sizes: object) =>
      new binding.CpuLlama({
        ...nativeModelFields(config),
        numBlocks: 4,
        blockSize: 4,
        layout: 'block-major',
        kvBuffer: new Uint8Array(4 * L * 2 * 4 * config.numKvHeads * config.headDim * 4),
        threads: 2,
        ...sizes,
      });
    expect(() => make({ redundantExpertSlots: 1 })).toThrow(/redundant expert slots need expert parallelism/);
    expect(() => make({ expertParallelSize: 2, redundantExpertSlots: -1 })).toThrow(/redundantExpertSlots/);
    const raw = make({ expertParallelSize: 2, redundantExpertSlots: 1 });
    try {
      const table = Int32Array.from(staticPlacement(L, E, 2, 1).layers.flatMap((lp) => Array.from(lp.slotToExpert)));
      expect(() => raw.applyExpertPlacement(new Int32Array(3))).toThrow(
        /has 3 slots; 2 layers x 2 ranks x 5 slots make 20/,
      );
      expect(() => raw.applyExpertPlacement(table)).toThrow(/once every weight is set; \d+ not set/);
      // ep 2, tp 1: everything but the experts on both ranks, expert e on rank e / 4.
      const expertOf = new Map(weightManifest(config).map((t) => [t.name, t.expert]));
      for (const t of weights) {
        const expert = expertOf.get(t.name);
        if (expert === undefined || expert < 0) for (const rank of [0, 1]) raw.setWeight(t.name, t.data, rank);
        else raw.setWeight(t.name, t.data, Math.floor(expert / 4));
      }
      raw.ready();
      await raw.forward(...forwardArgs(forwardBatch([{ blocks: [0], start: 0, tokens: [1, 2, 3] }])));
      // The first pass filled the redundant slots from the owners: the slots have moved.
      const expertTensor = weights.find((t) => (expertOf.get(t.name) ?? -1) === 1)!;
      expect(() => raw.setWeight(expertTensor.name, expertTensor.data, 0)).toThrow(
        /expert weights are set before the first forward pass or expert placement/,
      );
      const router = weights.find((t) => t.name.endsWith('.mlp.gate.weight'))!;
      raw.setWeight(router.name, router.data, 0); // other tensors still can be
      await expect(raw.applyExpertPlacement(table)).resolves.toEqual({ slotsCopied: 0, crossRankCopies: 0, bytes: 0 });
    } finally {
      await raw.dispose();
    }
  });

  it("the runner's per-rank token counts: the imbalance on the skewed model drops once the balancer's placement is applied", async () => {
    await using runner = await runnerFor(4, manual(1));
    const batch = forwardBatch(
      Array.from({ length: 6 }, (_, i) => ({
        blocks: [i * 4, i * 4 + 1, i * 4 + 2],
        start: 0,
        tokens: tokensOf(10, 20 + i),
      })),
    );
    const first = await runner.forward(batch);
    const staticLoad = runner.takeRankLoad();
    const load = runner.takeExpertLoad();
    // Counted once per (token, choice) pair, split over the ranks.
    expect(staticLoad.reduce((a, b) => a + b, 0)).toBe(L * 60 * config.moe!.topK);
    const before = rankImbalance(staticLoad, 4);
    const rows = Array.from({ length: L }, (_, l) => load.subarray(l * E, (l + 1) * E));
    const result = balanceExperts(rows, { numRanks: 4, redundantSlotsPerRank: 1 }, runner.expertPlacement);
    await runner.applyExpertPlacement(alignPlacement(runner.expertPlacement, result.placement));
    const again = await runner.forward(batch);
    expect(Array.from(again)).toEqual(Array.from(first));
    const after = rankImbalance(runner.takeRankLoad(), 4);
    expect(before).toBeGreaterThan(1.4); // the gates favour a few experts
    expect(after).toBeLessThan(before);
    expect(after).toBeLessThan(1.2); // 1.56 before, 1.09 after on this fixture
  });
});

/** A runner wrapper that calls `after(step)` once each pass has resolved (the engine awaits it before its next). */
function observed(runner: CpuModelRunner, after: (step: number) => void): ModelRunner {
  let step = 0;
  return {
    vocabSize: runner.vocabSize,
    blockSize: runner.blockSize,
    numBlocks: runner.numBlocks,
    maxPositions: runner.maxPositions,
    forward: async (batch: ForwardBatch) => {
      const logits = await runner.forward(batch);
      after(step++);
      return logits;
    },
    dispose: () => runner.dispose(),
  };
}

async function serve(runner: ModelRunner, requests: number) {
  const rng = randomLcg(0.11);
  const engine = new LlmEngine(runner);
  try {
    return await Promise.all(
      Array.from({ length: requests }, () =>
        engine
          .addRequest({
            promptTokenIds: Array.from({ length: 12 }, () => Math.floor(rng() * V)),
            sampling: { temperature: 0, maxTokens: 16 },
          })
          .result(),
      ),
    );
  } finally {
    await engine.dispose();
  }
}

describe('EPLB while serving through LlmEngine (dummy:tiny-moe with skewed gates)', () => {
  const REQUESTS = 8;
  const reference = (async () => serve(await runnerFor(1), REQUESTS))();

  it('a placement applied while requests run loses no request and changes no output', async () => {
    const runner = await runnerFor(2, manual(1));
    let applied: Promise<unknown> | undefined;
    const results = await serve(
      observed(runner, (step) => {
        // Requests are in flight: the engine's next pass is queued behind this change.
        if (step === 3) applied = runner.applyExpertPlacement(shuffled(2, 5));
      }),
      REQUESTS,
    );
    expect(((await applied) as { slotsCopied: number }).slotsCopied).toBeGreaterThan(0);
    const expected = await reference;
    expect(results.map((r) => r.finishReason)).toEqual(expected.map(() => 'length'));
    expect(results.map((r) => r.tokenIds)).toEqual(expected.map((r) => r.tokenIds));
  });

  it('a runner with the eplb option rebalances by itself between steps: outputs unchanged, per-rank imbalance lower', async () => {
    const runner = await runnerFor(4, {
      redundantSlotsPerRank: 1,
      windowSteps: 3,
      periodSteps: 3,
      minImbalanceGain: 0.05,
    });
    const balancer = runner.expertBalancer!;
    const steps: { imbalance: number; placementsApplied: number }[] = [];
    let holdsBalancerPlacement = true;
    const results = await serve(
      observed(
        runner,
        () =>
          steps.push({
            imbalance: rankImbalance(runner.takeRankLoad(), 4),
            // decisions applied before this step ran (this step's own decision is applied after it)
            placementsApplied: balancer.decisions.filter((d) => d.applied && d.step < steps.length + 1).length,
          }) && (holdsBalancerPlacement &&= deepEqual(runner.expertPlacement, balancer.placement)),
      ),
      REQUESTS,
    );
    const expected = await reference;
    expect(results.map((r) => r.tokenIds)).toEqual(expected.map((r) => r.tokenIds));
    expect(runner.eplbError).toBeUndefined();
    expect(balancer.decisions.some((d) => d.applied)).toBe(true);
    // After every step the runner held the balancer's placement.
    expect(holdsBalancerPlacement).toBe(true);
    const mean = (xs: number[]) => xs.reduce((a, b) => a + b, 0) / xs.length;
    const before = steps.filter((s) => s.placementsApplied === 0).map((s) => s.imbalance);
    const after = steps.filter((s) => s.placementsApplied > 0).map((s) => s.imbalance);
    expect(before.length).toBeGreaterThan(0);
    expect(after.length).toBeGreaterThan(0);
    expect(mean(after)).toBeLessThan(mean(before));
  });
});

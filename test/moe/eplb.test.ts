import { describe, expect, it } from 'vitest';
import { BadArgumentError } from '../../lib/errors.js';
import {
  balanceExperts,
  EPLB_DECISION_HISTORY,
  ExpertBalancer,
  ExpertLoadWindow,
  imbalance,
  rankLoads,
  replicate,
  routeToSlots,
  staticPlacement,
  type ExpertPlacement,
} from '../../lib/moe/index.js';

/** Deterministic PRNG (mulberry32). */
function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Zipf(s) loads over `numExperts` experts, hot experts at random positions. */
function zipfLoads(numLayers: number, numExperts: number, s: number, seed: number): Float64Array[] {
  const rand = rng(seed);
  return Array.from({ length: numLayers }, () => {
    const perm = Array.from({ length: numExperts }, (_, i) => i);
    for (let i = numExperts - 1; i > 0; i--) {
      const j = Math.floor(rand() * (i + 1));
      [perm[i], perm[j]] = [perm[j]!, perm[i]!];
    }
    const load = new Float64Array(numExperts);
    perm.forEach((e, rank) => (load[e] = Math.round(100000 / Math.pow(rank + 1, s))));
    return load;
  });
}

function checkInvariants(p: ExpertPlacement): void {
  for (const lp of p.layers) {
    expect(lp.slotToExpert.length).toBe(p.numRanks * p.slotsPerRank);
    // every expert has a replica; the maps agree
    for (let e = 0; e < p.numExperts; e++) {
      expect(lp.replicaCount[e]).toBeGreaterThanOrEqual(1);
      expect(lp.expertToSlots[e]!.length).toBe(lp.replicaCount[e]);
      for (const s of lp.expertToSlots[e]!) expect(lp.slotToExpert[s]).toBe(e);
    }
    // no rank holds an expert twice when the replicas could sit on distinct ranks
    const maxReplicas = Math.max(...lp.replicaCount);
    if (maxReplicas <= p.numRanks)
      for (let r = 0; r < p.numRanks; r++) {
        const held = lp.slotToExpert.subarray(r * p.slotsPerRank, (r + 1) * p.slotsPerRank);
        expect(new Set(held).size).toBe(p.slotsPerRank);
      }
  }
}

describe('replicate', () => {
  it('each extra slot goes to the expert with the highest load per replica', () => {
    // loads 90, 30, 10, 10 with 3 extra slots: 90 -> 2 (45), 45 > 30 -> 3 (30), tie 30 vs 30: lowest index (0) -> 4
    expect(Array.from(replicate([90, 30, 10, 10], 7))).toEqual([4, 1, 1, 1]);
    expect(Array.from(replicate([90, 30, 10, 10], 7, 2))).toEqual([2, 2, 2, 1]);
    expect(Array.from(replicate([5, 5], 2))).toEqual([1, 1]);
  });
});

describe('balanceExperts', () => {
  it('a worked example: 4 experts, 2 ranks, 1 redundant slot per rank', () => {
    const { placement, imbalanceBefore, imbalanceAfter } = balanceExperts([[60, 20, 10, 10]], {
      numRanks: 2,
      redundantSlotsPerRank: 1,
    });
    // static: rank 0 holds 60 + 20, rank 1 holds 10 + 10: max 80 / mean 50
    expect(imbalanceBefore[0]).toBeCloseTo(1.6, 12);
    // replicas: 60 -> 2 (30 each); a third would exceed one per rank, so 20 -> 2 (10 each)
    const lp = placement.layers[0]!;
    expect(Array.from(lp.replicaCount)).toEqual([2, 2, 1, 1]);
    // heaviest first onto the least-loaded rank: 30 r0, 30 r1, 10(e1) r0, 10(e1) r1, 10(e2) r0, 10(e3) r1
    expect(Array.from(lp.slotToExpert)).toEqual([0, 1, 2, 0, 1, 3]);
    expect(Array.from(rankLoads(placement, 0, [60, 20, 10, 10]))).toEqual([50, 50]);
    expect(imbalanceAfter[0]).toBe(1);
    expect(placement.slotsPerRank).toBe(3);
  });

  it('invariants hold and imbalance falls on Zipf-skewed loads, more redundancy not worse', () => {
    for (const [numExperts, numRanks] of [
      [8, 2],
      [16, 4],
      [64, 8],
      [128, 16],
    ] as const) {
      for (const s of [0.8, 1.2]) {
        const loads = zipfLoads(4, numExperts, s, numExperts * 31 + numRanks);
        let previous = Infinity;
        for (const redundant of [0, 1, 2, 4]) {
          const r = balanceExperts(loads, { numRanks, redundantSlotsPerRank: redundant });
          checkInvariants(r.placement);
          const after = Math.max(...r.imbalanceAfter);
          r.imbalanceAfter.forEach((a, l) => expect(a).toBeLessThanOrEqual(r.imbalanceBefore[l]! + 1e-12));
          // greedy packing is not exactly monotone in the slot count; near-even loads may wobble by a hair
          expect(after).toBeLessThanOrEqual(previous + 0.01);
          previous = after;
        }
        // with redundancy the skewed load comes close to even
        expect(previous).toBeLessThan(1.35);
        expect(
          Math.max(...balanceExperts(loads, { numRanks, redundantSlotsPerRank: 0 }).imbalanceBefore),
        ).toBeGreaterThan(1.1);
      }
    }
  });

  it('hierarchical: whole expert groups per node, balanced across nodes', () => {
    const numExperts = 32;
    const loads = zipfLoads(2, numExperts, 1.0, 7);
    const r = balanceExperts(loads, { numRanks: 8, redundantSlotsPerRank: 1, numNodes: 2, numExpertGroups: 4 });
    checkInvariants(r.placement);
    const groupSize = numExperts / 4;
    const ranksPerNode = 4;
    r.placement.layers.forEach((lp, l) => {
      // every expert's replicas on one node, and each node's experts are whole groups (2 groups each)
      const nodeOfGroup = new Map<number, number>();
      for (let e = 0; e < numExperts; e++) {
        const nodes = new Set(lp.expertToSlots[e]!.map((s) => Math.floor(s / r.placement.slotsPerRank / ranksPerNode)));
        expect(nodes.size).toBe(1);
        const node = [...nodes][0]!;
        const g = Math.floor(e / groupSize);
        if (nodeOfGroup.has(g)) expect(nodeOfGroup.get(g)).toBe(node);
        nodeOfGroup.set(g, node);
      }
      expect([...nodeOfGroup.values()].filter((n) => n === 0).length).toBe(2);
      expect(r.imbalanceAfter[l]).toBeLessThan(r.imbalanceBefore[l]!);
    });
    // global balancing is at least as good as the group-constrained one
    const g = balanceExperts(loads, { numRanks: 8, redundantSlotsPerRank: 1 });
    g.imbalanceAfter.forEach((a, l) => expect(a).toBeLessThanOrEqual(r.imbalanceAfter[l]! + 1e-9));
  });

  it('balancing against a current placement reports that placement as before', () => {
    const loads = zipfLoads(1, 16, 1.1, 3);
    const first = balanceExperts(loads, { numRanks: 4, redundantSlotsPerRank: 1 });
    const again = balanceExperts(loads, { numRanks: 4, redundantSlotsPerRank: 1 }, first.placement);
    expect(again.imbalanceBefore[0]).toBeCloseTo(first.imbalanceAfter[0]!, 12);
    expect(Array.from(again.placement.layers[0]!.slotToExpert)).toEqual(
      Array.from(first.placement.layers[0]!.slotToExpert),
    );
  });

  it('bad input is a BadArgumentError naming the problem', () => {
    const bad = (f: () => unknown, msg: RegExp) => {
      expect(f).toThrow(BadArgumentError);
      expect(f).toThrow(msg);
    };
    bad(() => balanceExperts([[1, -2, 3, 4]], { numRanks: 2, redundantSlotsPerRank: 0 }), /expert 1 is -2/);
    bad(() => balanceExperts([[1, NaN, 3, 4]], { numRanks: 2, redundantSlotsPerRank: 0 }), /expert 1 is NaN/);
    bad(
      () => balanceExperts([[1, 2, 3]], { numRanks: 2, redundantSlotsPerRank: 1 }),
      /3 experts do not divide over 2 ranks/,
    );
    bad(
      () => balanceExperts([[1, 2]], { numRanks: 4, redundantSlotsPerRank: 0 }),
      /more ranks \(4\) than physical expert slots/,
    );
    bad(() => balanceExperts([[1, 2], [1]], { numRanks: 2, redundantSlotsPerRank: 0 }), /layer 1 has 1 experts/);
    bad(() => balanceExperts([], { numRanks: 2, redundantSlotsPerRank: 0 }), /at least one layer/);
    bad(() => balanceExperts([[1, 2]], { numRanks: 0, redundantSlotsPerRank: 0 }), /numRanks/);
    bad(() => balanceExperts([[1, 2]], { numRanks: 2, redundantSlotsPerRank: -1 }), /redundantSlotsPerRank/);
    bad(
      () => balanceExperts([[1, 2, 3, 4]], { numRanks: 4, redundantSlotsPerRank: 0, numNodes: 2, numExpertGroups: 3 }),
      /4 experts do not divide into 3 groups/,
    );
    bad(
      () => balanceExperts([[1, 2, 3, 4]], { numRanks: 4, redundantSlotsPerRank: 0, numNodes: 3 }),
      /4 ranks do not divide over 3 nodes/,
    );
  });
});

describe('staticPlacement', () => {
  it('contiguous experts per rank, redundant slots holding the following experts, no rank holding one twice', () => {
    const p = staticPlacement(1, 8, 4, 2);
    expect(p.slotsPerRank).toBe(4);
    expect(Array.from(p.layers[0]!.slotToExpert)).toEqual([0, 1, 2, 3, 2, 3, 4, 5, 4, 5, 6, 7, 6, 7, 0, 1]);
    expect(Array.from(p.layers[0]!.replicaCount)).toEqual([2, 2, 2, 2, 2, 2, 2, 2]);
    expect(Array.from(staticPlacement(1, 8, 4).layers[0]!.slotToExpert)).toEqual([0, 1, 2, 3, 4, 5, 6, 7]);
  });
});

describe('routeToSlots', () => {
  it("spreads an expert's tokens evenly over its replicas and keeps single-replica experts on their slot", () => {
    const { placement } = balanceExperts([[60, 20, 10, 10]], { numRanks: 2, redundantSlotsPerRank: 1 });
    const tokens = Int32Array.from({ length: 300 }, (_, i) => (i % 10 < 6 ? 0 : i % 10 < 8 ? 1 : (i % 10) - 6));
    const slots = routeToSlots(placement, 0, tokens);
    const perSlot = new Map<number, number>();
    slots.forEach((s, t) => {
      expect(placement.layers[0]!.slotToExpert[s]).toBe(tokens[t]);
      perSlot.set(s, (perSlot.get(s) ?? 0) + 1);
    });
    for (const s of placement.layers[0]!.expertToSlots[0]!) expect(perSlot.get(s)).toBe(90);
    const perRank = [0, 0];
    slots.forEach((s) => perRank[Math.floor(s / placement.slotsPerRank)]!++);
    expect(perRank).toEqual([150, 150]);
    expect(() => routeToSlots(placement, 0, [4])).toThrow(BadArgumentError);
    expect(() => routeToSlots(placement, 1, [0])).toThrow(BadArgumentError);
  });
});

describe('ExpertLoadWindow', () => {
  it('sums the last N steps per layer and expert', () => {
    const w = new ExpertLoadWindow(2, 3, 2);
    w.record([1, 2, 3, 4, 5, 6]);
    w.record([10, 0, 0, 0, 0, 1]);
    expect(w.totals().map((r) => Array.from(r))).toEqual([
      [11, 2, 3],
      [4, 5, 7],
    ]);
    w.record([0, 0, 0, 0, 0, 0]); // the first step leaves
    expect(w.totals().map((r) => Array.from(r))).toEqual([
      [10, 0, 0],
      [0, 0, 1],
    ]);
    expect(w.steps).toBe(2);
    expect(w.totalSteps).toBe(3);
    expect(() => w.record([1, 2])).toThrow(BadArgumentError);
    expect(() => w.record([1, 2, 3, 4, 5, -1])).toThrow(BadArgumentError);
    expect(() => new ExpertLoadWindow(1, 1, 0)).toThrow(BadArgumentError);
  });
});

describe('ExpertBalancer', () => {
  const numLayers = 2;
  const numExperts = 16;
  const skewed = zipfLoads(numLayers, numExperts, 1.2, 11);
  const stepCounts = Float64Array.from({ length: numLayers * numExperts }, (_, i) =>
    Math.round(skewed[Math.floor(i / numExperts)]![i % numExperts]! / 1000),
  );

  it('decides every period once the window is full, applying a placement that clears the gain', () => {
    const b = new ExpertBalancer(numLayers, numExperts, 4, {
      windowSteps: 3,
      periodSteps: 2,
      redundantSlotsPerRank: 1,
      minImbalanceGain: 0.05,
    });
    const decisions = [];
    for (let s = 0; s < 8; s++) decisions.push(b.step(stepCounts));
    // the window is full after step 3 (the period of 2 has passed by then); then every 2 steps
    expect(decisions.map((d) => d !== undefined)).toEqual([false, false, true, false, true, false, true, false]);
    const first = decisions[2]!;
    expect(first.applied).toBe(true);
    expect(first.gain).toBeGreaterThan(0.05);
    expect(b.placement).toBe(first.result.placement);
    // the same load again: nothing left to gain, the placement stays
    const second = decisions[4]!;
    expect(second.applied).toBe(false);
    expect(second.gain).toBeLessThan(0.05);
    expect(b.placement).toBe(first.result.placement);
  });

  it('a gain below minImbalanceGain leaves the placement unchanged', () => {
    const b = new ExpertBalancer(numLayers, numExperts, 4, {
      windowSteps: 1,
      periodSteps: 1,
      redundantSlotsPerRank: 1,
      minImbalanceGain: 0.99,
    });
    const before = b.placement;
    const d = b.step(stepCounts)!;
    expect(d.gain).toBeGreaterThan(0);
    expect(d.gain).toBeLessThan(0.99);
    expect(d.applied).toBe(false);
    expect(b.placement).toBe(before);
    expect(b.placement).toEqual(staticPlacement(numLayers, numExperts, 4, 1));
    expect(imbalance(rankLoads(b.placement, 0, b.window.totals()[0]!))).toBeCloseTo(d.result.imbalanceBefore[0]!, 12);
  });

  it('rejects a bad policy', () => {
    const p = { windowSteps: 1, periodSteps: 1, redundantSlotsPerRank: 0, minImbalanceGain: 0 };
    expect(() => new ExpertBalancer(1, 4, 2, { ...p, windowSteps: 0 })).toThrow(BadArgumentError);
    expect(() => new ExpertBalancer(1, 4, 2, { ...p, minImbalanceGain: 1 })).toThrow(BadArgumentError);
    expect(() => new ExpertBalancer(1, 4, 2, { ...p, redundantSlotsPerRank: 0.5 })).toThrow(BadArgumentError);
  });
});

describe('ExpertBalancer history', () => {
  it('keeps the latest EPLB_DECISION_HISTORY decisions and counts every one', () => {
    const balancer = new ExpertBalancer(1, 4, 2, {
      windowSteps: 1,
      periodSteps: 1,
      redundantSlotsPerRank: 0,
      minImbalanceGain: 0,
    });
    const steps = EPLB_DECISION_HISTORY + 40;
    // Load alternating between the two halves of the experts: every other decision moves experts.
    for (let s = 0; s < steps; s++) balancer.step(s % 2 ? [9, 9, 1, 1] : [1, 1, 9, 9]);
    expect(balancer.decisionCount).toBe(steps);
    expect(balancer.decisions.length).toBe(EPLB_DECISION_HISTORY);
    expect(balancer.decisions[0]!.step).toBe(steps - EPLB_DECISION_HISTORY + 1);
    expect(balancer.decisions.at(-1)!.step).toBe(steps);
    expect(balancer.appliedCount).toBeGreaterThan(0);
    expect(balancer.appliedCount).toBeLessThanOrEqual(steps);
  });
});

/**
 * The GPU engine's expert-parallel bookkeeping (lib/engine/cuda-experts.ts) without a GPU: ranks stand in for
 * native CudaLlama ranks with slot memory in JavaScript (each slot holding the id of the expert whose weights it
 * has, at device-like addresses any rank can read), so that the two-phase placement change (every rank stages its
 * sources, then writes its slots and switches its table), the copies it plans, the initial fill of redundant slots,
 * the load read back after each pass and the balancer following it are checked here; test/gpu/14.engine.ep.gpu.test.ts
 * runs the same on the device.
 */
import { describe, expect, it } from 'vitest';
import { BadArgumentError, ParallelLayoutError } from '../../lib/errors.js';
import { checkCudaExpertParallel, CudaExpertRanks } from '../../lib/engine/cuda-experts.js';
import { dummyConfig } from '../../lib/engine/model/dummy.js';
import { ExpertBalancer } from '../../lib/moe/policy.js';
import { layerPlacementFromSlots, staticPlacement, type ExpertPlacement } from '../../lib/moe/eplb.js';
import type { RawCudaLlama } from '../../lib/native/binding.js';

/** Memory of every rank's slots: address -> the expert whose weights are there (-1: never written). */
type Memory = Map<number, number>;

/** A rank with `slotsPerRank` slots per layer, its own experts in its first slots (CudaMoe's initial state). */
function fakeRank(memory: Memory, rank: number, ranks: number, layers: number, experts: number, redundant: number) {
  const S = experts / ranks + redundant;
  const own = experts / ranks;
  const table = new Int32Array(layers * ranks * S).fill(-1);
  for (let l = 0; l < layers; l++)
    for (let r = 0; r < ranks; r++) for (let j = 0; j < own; j++) table[(l * ranks + r) * S + j] = r * own + j;
  const address = (l: number, s: number) => ((rank * 1000 + l) * 100 + s) * 2;
  for (let l = 0; l < layers; l++)
    for (let s = 0; s < S; s++) {
      const e = table[(l * ranks + rank) * S + s]!;
      memory.set(address(l, s), e);
      memory.set(address(l, s) + 1, e);
    }
  let staged: number[] = [];
  const pending: { perExpert: Float64Array; pairsRun: Float64Array }[] = [];
  const fake = {
    disposed: false,
    stagedCalls: 0,
    commits: 0,
    expertPlacement: () => ({ ranks, slotsPerRank: S, slotExpert: table.slice() }),
    expertSlotAddress: (l: number, s: number): [number, number] => {
      if (s < 0 || s >= S) throw new Error(`slot ${s} out of range`);
      return [address(l, s), address(l, s) + 1];
    },
    stageExperts: async (sources: Float64Array) => {
      fake.stagedCalls++;
      staged = [];
      for (let i = 0; i < sources.length; i += 2) {
        const gateUp = memory.get(sources[i]!)!;
        expect(memory.get(sources[i + 1]!), 'down lies with its gate_up').toBe(gateUp);
        staged.push(gateUp);
      }
    },
    commitExperts: async (dests: Int32Array, placement: Int32Array) => {
      fake.commits++;
      expect(dests.length / 2).toBe(staged.length);
      for (let i = 0; i < dests.length; i += 2) {
        memory.set(address(dests[i]!, dests[i + 1]!), staged[i / 2]!);
        memory.set(address(dests[i]!, dests[i + 1]!) + 1, staged[i / 2]!);
      }
      table.set(placement);
      return { slotsCopied: dests.length / 2, bytes: (dests.length / 2) * 100 };
    },
    takeExpertLoad: async () => pending.shift()!,
    /** What the next takeExpertLoad returns. */
    queueLoad: (perExpert: number[], pairsRun: number[]) =>
      pending.push({ perExpert: Float64Array.from(perExpert), pairsRun: Float64Array.from(pairsRun) }),
    /** Every slot of this rank holds the expert its table says. */
    consistent: () => {
      for (let l = 0; l < layers; l++)
        for (let s = 0; s < S; s++)
          if (memory.get(address(l, s)) !== table[(l * ranks + rank) * S + s]) return `layer ${l} slot ${s}`;
      return 'ok';
    },
  };
  return fake;
}

function group(ranks: number, redundant: number, balancer?: ExpertBalancer) {
  const config = dummyConfig('tiny-moe'); // 2 layers, 8 experts, top 2
  const memory: Memory = new Map();
  const fakes = Array.from({ length: ranks }, (_, r) =>
    fakeRank(memory, r, ranks, config.numLayers, config.moe!.numExperts, redundant),
  );
  const experts = new CudaExpertRanks(fakes as unknown as RawCudaLlama[], config, balancer);
  return { config, fakes, experts };
}

/** A placement whose slot -> expert rows are taken as they are (nothing derived: rows a balancer would not give). */
function rawPlacement(row: number[], ranks: number, slotsPerRank: number): ExpertPlacement {
  const layer = { slotToExpert: Int32Array.from(row), expertToSlots: [], replicaCount: new Int32Array(8) };
  return { numExperts: 8, numRanks: ranks, slotsPerRank, layers: [layer, layer] };
}

/** A placement of `ranks` x `slotsPerRank` slots from one slot -> expert row for every layer. */
function placementOf(row: number[], ranks: number, slotsPerRank: number, layers = 2): ExpertPlacement {
  return {
    numExperts: 8,
    numRanks: ranks,
    slotsPerRank,
    layers: Array.from({ length: layers }, () => layerPlacementFromSlots(Int32Array.from(row), 8)),
  };
}

describe('CudaExpertRanks: placements over GPU ranks', () => {
  it('fills the redundant slots as staticPlacement has them, from their owners, in two phases over every rank', async () => {
    const { fakes, experts } = group(4, 1);
    await experts.fillRedundantSlots();
    expect(experts.placement).toEqual(staticPlacement(2, 8, 4, 1));
    for (const f of fakes) {
      expect(f.consistent()).toBe('ok');
      expect([f.stagedCalls, f.commits]).toEqual([1, 1]);
    }
  });

  it('a placement that swaps experts between ranks copies through staging: every slot ends with its expert', async () => {
    const { fakes, experts } = group(2, 1);
    await experts.fillRedundantSlots();
    // Rank 0 takes experts 4..7 and rank 1 takes 0..3 (every slot rewritten, each copied from the other rank), with
    // the redundant slots replicating expert 0 and expert 7.
    const next = placementOf([4, 5, 6, 7, 0, 0, 1, 2, 3, 7], 2, 5);
    const change = await experts.apply(next);
    expect(change.slotsCopied).toBe(2 * 10);
    // From its own rank where it holds the expert already: rank 0's 4 and 0, rank 1's 0 and 7; the rest cross.
    expect(change.crossRankCopies).toBe(2 * 6);
    expect(change.bytes).toBe(20 * 100);
    for (const f of fakes) expect(f.consistent()).toBe('ok');
    expect(Array.from(experts.placement.layers[1]!.slotToExpert)).toEqual([4, 5, 6, 7, 0, 0, 1, 2, 3, 7]);
    // Applying the same placement again copies nothing.
    expect((await experts.apply(next)).slotsCopied).toBe(0);
  });

  it('refuses a placement of another shape, an expert out of range or without a replica, changing nothing', async () => {
    const { fakes, experts } = group(2, 1);
    await experts.fillRedundantSlots();
    const before = experts.placement;
    const bad: [ExpertPlacement, RegExp][] = [
      [placementOf([0, 1, 2, 3, 4, 5, 6, 7], 2, 4), /2 ranks x 5 slots; the placement is 2 x 8 on 2 x 4/],
      [rawPlacement([0, 1, 2, 3, 4, 5, 6, 7, 9, 0], 2, 5), /layer 0 slot 8 holds expert 9; the model has 0..7/],
      [rawPlacement([0, 1, 2, 3, 4, 5, 6, 7, 0], 2, 5), /layer 0 has 9 slots; the runner has 10/],
      [placementOf([0, 1, 2, 3, 4, 5, 6, 0, 0, 0], 2, 5), /layer 0 leaves expert 7 without a replica/],
      [{ ...placementOf([0, 1, 2, 3, 4, 5, 6, 7, 0, 1], 2, 5), layers: [] }, /the placement is 0 x 8/],
    ];
    for (const [placement, message] of bad) {
      const error = await experts.apply(placement).then(
        () => undefined,
        (e: unknown) => e,
      );
      expect(error).toBeInstanceOf(BadArgumentError);
      expect((error as Error).message).toMatch(message);
    }
    expect(experts.placement).toEqual(before);
    for (const f of fakes) expect([f.stagedCalls, f.commits]).toEqual([1, 1]); // only the initial fill
  });

  it('sums the load read back after each pass until taken: rank 0 per expert, every rank its pairs', async () => {
    const { fakes, experts } = group(2, 0);
    const perExpert = (base: number) => Array.from({ length: 16 }, (_, i) => base + i);
    fakes[0]!.queueLoad(perExpert(0), [3, 4]);
    fakes[1]!.queueLoad(perExpert(100), [5, 6]); // another rank's routing counts are not used: they are rank 0's
    await experts.afterPass();
    fakes[0]!.queueLoad(perExpert(1), [1, 1]);
    fakes[1]!.queueLoad(perExpert(100), [2, 2]);
    await experts.afterPass();
    expect(Array.from(experts.takeExpertLoad())).toEqual(perExpert(0).map((x) => 2 * x + 1));
    // Layer-major, numLayers x ranks.
    expect(Array.from(experts.takeRankLoad())).toEqual([4, 7, 5, 8]);
    expect(experts.takeExpertLoad().every((x) => x === 0)).toBe(true);
    expect(experts.takeRankLoad().every((x) => x === 0)).toBe(true);
  });

  it('feeds the balancer each pass and applies what it decides, on the ranks and in the balancer', async () => {
    const balancer = new ExpertBalancer(2, 8, 2, {
      windowSteps: 2,
      periodSteps: 2,
      redundantSlotsPerRank: 1,
      minImbalanceGain: 0.01,
    });
    const { fakes, experts } = group(2, 1, balancer);
    await experts.fillRedundantSlots();
    // Experts 0 and 1 (both on rank 0) take almost every pair.
    const skewed = [500, 400, 1, 1, 1, 1, 1, 1];
    for (let step = 0; step < 2; step++) {
      for (const f of fakes) f.queueLoad([...skewed, ...skewed], [0, 0]);
      await experts.afterPass();
    }
    const applied = balancer.decisions.filter((d) => d.applied);
    expect(applied.length).toBe(1);
    expect(experts.eplbError).toBeUndefined();
    expect(experts.placement).toEqual(balancer.placement);
    // The hot experts are no longer both only on rank 0.
    const slots = experts.placement.layers[0]!.expertToSlots;
    const ranksOf = (e: number) => new Set(slots[e]!.map((s) => Math.floor(s / 5)));
    expect(ranksOf(0).size + ranksOf(1).size).toBeGreaterThan(2);
    for (const f of fakes) expect(f.consistent()).toBe('ok');
  });
});

describe('checkCudaExpertParallel', () => {
  const moe = dummyConfig('tiny-moe');
  it.each([
    [1, 2, 2],
    [2, 2, 2],
    [1, 8, 8],
    [1, 1, 1],
  ])('tp %s x ep %s fits an 8-expert model on the GPU engine', (tp, ep, expected) => {
    expect(checkCudaExpertParallel(moe, tp, ep, 'w')).toBe(expected);
  });
  it.each([
    [2, 1, /w: the GPU engine splits a mixture-of-experts model's experts over its ranks \(ep = tp\)/],
    [1, 3, /expert parallel size 3 does not divide the model's 8 experts/],
    [2, 4, /tp must be 1 \(attention replicated\) or 4/],
    [1, 16, /w: expert parallel size 16 is more than the 8 ranks the GPU engine runs/],
  ])('tp %s x ep %s is a ParallelLayoutError', (tp, ep, message) => {
    const call = () => checkCudaExpertParallel(moe, tp, ep, 'w');
    expect(call).toThrow(ParallelLayoutError);
    expect(call).toThrow(message);
  });
  it('a dense model takes no ep but any tp the GPU engine takes', () => {
    expect(checkCudaExpertParallel(dummyConfig('tiny'), 2, 1, 'w')).toBe(1);
    expect(() => checkCudaExpertParallel(dummyConfig('tiny'), 1, 2, 'w')).toThrow(/needs a mixture-of-experts model/);
  });
});

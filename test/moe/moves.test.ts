import { describe, expect, it } from 'vitest';
import { BadArgumentError } from '../../lib/errors.js';
import {
  alignPlacement,
  balanceExperts,
  ExpertBalancer,
  expertMoves,
  rankLoads,
  staticPlacement,
  type ExpertPlacement,
} from '../../lib/moe/index.js';

function skewed(layers: number, experts: number, salt: number): number[][] {
  return Array.from({ length: layers }, (_, l) =>
    Array.from({ length: experts }, (_, e) => Math.round(1000 / (1 + ((e * 7 + l * 3 + salt) % experts)))),
  );
}

const rankSets = (p: ExpertPlacement, l: number) =>
  Array.from({ length: p.numRanks }, (_, r) =>
    Array.from(p.layers[l]!.slotToExpert.subarray(r * p.slotsPerRank, (r + 1) * p.slotsPerRank)).sort((a, b) => a - b),
  );

describe('alignPlacement and expertMoves', () => {
  const opts = { numRanks: 4, redundantSlotsPerRank: 2 };
  const first = balanceExperts(skewed(2, 16, 0), opts).placement;
  const second = balanceExperts(skewed(2, 16, 5), opts).placement;

  it('aligning keeps every rank its experts and puts the ones it keeps back in their slots', () => {
    const aligned = alignPlacement(first, second);
    for (let l = 0; l < 2; l++) {
      expect(rankSets(aligned, l)).toEqual(rankSets(second, l));
      const load = skewed(2, 16, 5)[l]!;
      expect(Array.from(rankLoads(aligned, l, load))).toEqual(Array.from(rankLoads(second, l, load)));
      aligned.layers[l]!.slotToExpert.forEach((e, s) => {
        const rank = Math.floor(s / aligned.slotsPerRank);
        const had = first.layers[l]!.slotToExpert.subarray(rank * 6, rank * 6 + 6);
        const keeps = rankSets(second, l)[rank]!.includes(first.layers[l]!.slotToExpert[s]!);
        if (keeps) expect(e).toBe(first.layers[l]!.slotToExpert[s]);
        else expect(had.includes(e) && e !== first.layers[l]!.slotToExpert[s]).toBe(false);
      });
    }
    expect(expertMoves(first, aligned).length).toBeLessThanOrEqual(expertMoves(first, second).length);
  });

  it('the moves turn the current placement into the next, each from a rank holding the expert, locally where it can', () => {
    const next = alignPlacement(first, second);
    const moves = expertMoves(first, next);
    expect(moves.length).toBeGreaterThan(0);
    const applied = first.layers.map((lp) => Int32Array.from(lp.slotToExpert));
    for (const m of moves) {
      const holders = first.layers[m.layer]!.expertToSlots[m.expert]!.map((s) => Math.floor(s / first.slotsPerRank));
      expect(holders).toContain(m.sourceRank);
      if (holders.includes(m.rank)) expect(m.sourceRank).toBe(m.rank);
      expect(m.rank).toBe(Math.floor(m.slot / first.slotsPerRank));
      applied[m.layer]![m.slot] = m.expert;
    }
    applied.forEach((slots, l) => expect(Array.from(slots)).toEqual(Array.from(next.layers[l]!.slotToExpert)));
    expect(expertMoves(next, next)).toEqual([]);
  });

  it('placements of different shapes are refused', () => {
    expect(() => expertMoves(staticPlacement(2, 16, 4), first)).toThrow(BadArgumentError);
    expect(() => alignPlacement(staticPlacement(1, 16, 4), staticPlacement(2, 16, 4))).toThrow(BadArgumentError);
  });

  it('the balancer reports the copies of each decision; the same load again moves nothing', () => {
    const b = new ExpertBalancer(2, 16, 4, {
      windowSteps: 1,
      periodSteps: 1,
      redundantSlotsPerRank: 1,
      minImbalanceGain: 0.01,
    });
    const step = skewed(2, 16, 0).flat();
    const d1 = b.step(step)!;
    expect(d1.applied).toBe(true);
    expect(d1.moves.length).toBeGreaterThan(0);
    const d2 = b.step(step)!;
    expect(d2.applied).toBe(false);
    expect(d2.moves).toEqual([]);
  });
});

/**
 * Applying a new expert placement online: which expert weights must be copied where. A rank that keeps an
 * expert keeps it in place (`alignPlacement` puts it back in the slot it had), so only the slots whose expert
 * changes are filled, each from a rank that already holds that expert (its own rank first: a local copy).
 */
import { BadArgumentError } from '../errors.js';
import { layerPlacementFromSlots, type ExpertPlacement } from './eplb.js';

/** One slot to fill: copy `expert`'s weights of `layer` from `sourceRank` into `slot` on `rank`. */
export interface ExpertMove {
  layer: number;
  slot: number;
  rank: number;
  expert: number;
  /** A rank that holds the expert under the current placement (`rank` itself when it already has a replica). */
  sourceRank: number;
}

function checkSameShape(current: ExpertPlacement, next: ExpertPlacement): void {
  if (
    current.numRanks !== next.numRanks ||
    current.slotsPerRank !== next.slotsPerRank ||
    current.numExperts !== next.numExperts ||
    current.layers.length !== next.layers.length
  )
    throw new BadArgumentError(
      `placements differ in shape: ${current.layers.length} layers x ${current.numExperts} experts on ` +
        `${current.numRanks} x ${current.slotsPerRank} slots, against ${next.layers.length} x ${next.numExperts} ` +
        `on ${next.numRanks} x ${next.slotsPerRank}`,
    );
}

/**
 * `next` with each rank's slots reordered so that every expert a rank holds under both placements stays in a
 * slot it has now: the same experts per rank (same loads), fewest slots rewritten.
 */
export function alignPlacement(current: ExpertPlacement, next: ExpertPlacement): ExpertPlacement {
  checkSameShape(current, next);
  const S = next.slotsPerRank;
  const layers = next.layers.map((lp, l) => {
    const now = current.layers[l]!.slotToExpert;
    const out = new Int32Array(lp.slotToExpert.length).fill(-1);
    for (let r = 0; r < next.numRanks; r++) {
      const base = r * S;
      const pending = Array.from(lp.slotToExpert.subarray(base, base + S));
      // Experts the rank keeps go back to their slots (one replica per slot).
      for (let j = 0; j < S; j++) {
        const i = pending.indexOf(now[base + j]!);
        if (i >= 0) {
          out[base + j] = pending[i]!;
          pending.splice(i, 1);
        }
      }
      // The rest fill the free slots in order.
      for (let j = 0; j < S; j++) if (out[base + j] === -1) out[base + j] = pending.shift()!;
    }
    return layerPlacementFromSlots(out, next.numExperts);
  });
  return { ...next, layers };
}

/** The copies that turn `current` into `next` (align `next` first to keep them few), layer by layer, slot order. */
export function expertMoves(current: ExpertPlacement, next: ExpertPlacement): ExpertMove[] {
  checkSameShape(current, next);
  const S = next.slotsPerRank;
  const moves: ExpertMove[] = [];
  next.layers.forEach((lp, layer) => {
    const cur = current.layers[layer]!;
    // Copies sent by each rank so far in this layer: spread the sources.
    const sent = new Int32Array(next.numRanks);
    lp.slotToExpert.forEach((expert, slot) => {
      if (cur.slotToExpert[slot] === expert) return;
      const rank = Math.floor(slot / S);
      const holders = cur.expertToSlots[expert]!.map((s) => Math.floor(s / S));
      if (holders.length === 0)
        throw new BadArgumentError(`layer ${layer}: expert ${expert} has no replica to copy from`);
      let sourceRank = holders.includes(rank) ? rank : holders[0]!;
      if (sourceRank !== rank) for (const h of holders) if (sent[h]! < sent[sourceRank]!) sourceRank = h;
      if (sourceRank !== rank) sent[sourceRank]!++;
      moves.push({ layer, slot, rank, expert, sourceRank });
    });
  });
  return moves;
}

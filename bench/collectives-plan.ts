/**
 * What `npm run bench:collectives` runs: operations, sizes and repetitions per entry (bench/collectives.ts
 * hands the same plan to both sides, Tandem and PyTorch).
 */

export const OPS = ['allReduce', 'allGather', 'reduceScatter', 'broadcast', 'reduce', 'allToAll', 'sendRecv'] as const;
export type BenchOp = (typeof OPS)[number];
export const DTYPE_BYTES = { float32: 4, bfloat16: 2, float16: 2 } as const;
export type BenchDtype = keyof typeof DTYPE_BYTES;

export interface PlanEntry {
  op: BenchOp;
  bytes: number;
  warmup: number;
  iters: number;
  reps: number;
  /** 0: no latency measurement at this size. */
  latencyIters: number;
}
export interface Plan {
  dtype: BenchDtype;
  ranks: number;
  entries: PlanEntry[];
}

const MiB = 1 << 20;

/** '16MiB', '64KiB', '1GiB', '4096' -> bytes. */
export function parseSize(text: string): number {
  const m = /^(\d+)(B|KiB|MiB|GiB)?$/.exec(text.trim());
  if (!m) throw new Error(`--sizes: cannot read '${text}' (e.g. 4096, 64KiB, 16MiB, 1GiB)`);
  return Number(m[1]) * { B: 1, KiB: 1024, MiB: MiB, GiB: 1 << 30 }[(m[2] ?? 'B') as 'B'];
}

export function makePlan(
  quick: boolean,
  ranks: number,
  dtype: BenchDtype,
  ops: readonly BenchOp[],
  only?: number[],
): Plan {
  const sizes = only
    ? only
    : quick
      ? [8, 64 * 1024, MiB, 16 * MiB, 128 * MiB]
      : [8, 1024, 64 * 1024, MiB, 4 * MiB, 16 * MiB, 64 * MiB, 256 * MiB, 1024 * MiB];
  const unit = ranks * DTYPE_BYTES[dtype];
  const entries: PlanEntry[] = [];
  for (const op of ops) {
    for (const raw of sizes) {
      const bytes = Math.max(unit, Math.floor(raw / unit) * unit);
      // About 4 GiB of traffic per run (less in quick mode), between 5 and 1000 operations.
      const budget = quick ? 2 ** 30 : 4 * 2 ** 30; // (4 << 30 is 0 in 32-bit JS shifts)
      const iters = Math.max(quick ? 3 : 5, Math.min(1000, Math.floor(budget / bytes)));
      entries.push({
        op,
        bytes,
        warmup: Math.min(iters, 10),
        iters,
        reps: quick ? 2 : 3,
        latencyIters: bytes < MiB ? (quick ? 100 : 300) : bytes <= 16 * MiB ? (quick ? 20 : 50) : 0,
      });
    }
  }
  return { dtype, ranks, entries };
}

/**
 * The targets `bench:transfer` is judged by, scored from the rows of one run. Each target names the rows it
 * reads; a target whose rows the run did not measure (no second GPU, --host-only, --quick sizes) is
 * "not measured", never met. Ratios are the rows' own: a transfer's GB/s from its p50 post-to-resolution
 * latency over its baseline's, whose GB/s comes from CUDA events (GPU time alone) or an in-process memcpy.
 */

/** The fields of a bench:transfer row the scorecard reads. */
export interface ScoredRow {
  section: string;
  path: string;
  op: string;
  memory: string;
  pieceBytes: number;
  pieces: number;
  bytes: number;
  notifyP50us?: number;
  prepareMs?: number;
  postUs?: number;
  vsBaseline?: number;
  pipelinedGbps?: number;
  vsNccl?: number;
}

export type TargetResult = 'met' | 'missed' | 'not measured' | 'not scored';

export interface TargetScore {
  target: string;
  /** What was measured: the worst row's figure first (all of them, up to 4 rows), and how many rows met it. */
  measured: string;
  result: TargetResult;
  /** The rows it was scored on, as `path op memory piece x count`. */
  rows: string[];
}

const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;

/** Bytes as bench:transfer's table writes them (binary units). */
export const human = (b: number) =>
  b >= GiB ? `${+(b / GiB).toFixed(2)} GiB` : b >= MiB ? `${+(b / MiB).toFixed(1)} MiB` : `${b / KiB} KiB`;

export const rowName = (r: ScoredRow) => `${r.path} ${r.op} ${r.memory} ${human(r.pieceBytes)} x ${r.pieces}`;
const pct = (x: number) => `${(x * 100).toFixed(1)}%`;

const ACROSS = 'cuda-ipc GPU0->GPU1';
const isTransfer = (r: ScoredRow) => r.op === 'READ' || r.op === 'WRITE';

/**
 * Scores every row of `rows` that `pick` selects against `ok`; the worst row (by `key`, lowest first unless
 * `highIsBad`) is named in `measured`.
 */
function every(
  target: string,
  rows: ScoredRow[],
  pick: (r: ScoredRow) => boolean,
  value: (r: ScoredRow) => number | undefined,
  ok: (v: number) => boolean,
  show: (v: number) => string,
  highIsBad = false,
): TargetScore {
  const scored = rows.filter(pick).flatMap((r) => {
    const v = value(r);
    return v === undefined || !Number.isFinite(v) ? [] : [{ r, v }];
  });
  if (scored.length === 0) return { target, measured: '', result: 'not measured', rows: [] };
  scored.sort((a, b) => (highIsBad ? b.v - a.v : a.v - b.v));
  const misses = scored.filter((s) => !ok(s.v)).length;
  const worst = scored[0]!;
  const measured =
    scored.length === 1
      ? show(worst.v)
      : scored.length <= 4
        ? `${scored.map((s) => show(s.v)).join(', ')} (${scored.length - misses} of ${scored.length} rows met)`
        : `worst ${show(worst.v)} (${scored.length - misses} of ${scored.length} rows met)`;
  return { target, measured, result: misses === 0 ? 'met' : 'missed', rows: scored.map((s) => rowName(s.r)) };
}

/**
 * Scores the targets on one run's rows. `gpus`: how many CUDA devices the run used. The targets are
 * set for a host of two NVLinked GPUs, except the shm one, which is for machines without a GPU; on other
 * hosts a target's rows are still shown, as `not scored`.
 */
export function scoreTargets(rows: ScoredRow[], gpus: number): TargetScore[] {
  const out: TargetScore[] = [];
  const acrossDevice = (r: ScoredRow) =>
    r.path === ACROSS && isTransfer(r) && r.memory === 'device->device' && r.section === 'gpu';

  // The targets for two NVLinked GPUs.
  out.push(
    every(
      'scattered 64 KiB x 4096, cuda-ipc WRITE across GPUs: >= 95% of the peer copy',
      rows,
      (r) => acrossDevice(r) && r.op === 'WRITE' && r.pieceBytes === 64 * KiB && r.pieces === 4096,
      (r) => r.vsBaseline,
      (v) => v >= 0.95,
      pct,
    ),
  );
  out.push(
    every(
      'KV block-major and layer-major, cuda-ipc WRITE across GPUs: >= 95% of the peer copy',
      rows,
      (r) => r.section === 'kv' && r.path.startsWith(`${ACROSS} `) && /(block|layer)-major$/.test(r.path),
      (r) => r.vsBaseline,
      (v) => v >= 0.95,
      pct,
    ),
  );
  const againstNccl = (r: ScoredRow) =>
    isTransfer(r) && (r.path === ACROSS || (r.section === 'kv' && r.path.startsWith(`${ACROSS} `)));
  out.push(
    every(
      'cuda-ipc across GPUs >= NCCL send/recv at every total size from 64 KiB to 1 GiB (pipelined)',
      rows,
      (r) => againstNccl(r) && r.bytes >= 64 * KiB && r.bytes <= GiB,
      (r) => r.vsNccl,
      (v) => v >= 1,
      (v) => `${v.toFixed(2)}x`,
    ),
  );
  // The best transfer of 1 MiB in all (the target is NCCL's bandwidth at that total size).
  const at1MiB = rows.filter((r) => againstNccl(r) && r.bytes === MiB && r.vsNccl !== undefined);
  at1MiB.sort((a, b) => b.vsNccl! - a.vsNccl!);
  out.push(
    at1MiB.length === 0
      ? { target: '>= 5x NCCL send/recv at 1 MiB (pipelined)', measured: '', result: 'not measured', rows: [] }
      : {
          target: '>= 5x NCCL send/recv at 1 MiB (pipelined)',
          measured: `${at1MiB[0]!.vsNccl!.toFixed(2)}x`,
          result: at1MiB[0]!.vsNccl! >= 5 ? 'met' : 'missed',
          rows: [rowName(at1MiB[0]!)],
        },
  );
  // Notification: the polled target is how a decode worker that waits on the KV would take it.
  out.push(
    every(
      '64 KiB WRITE + notification across GPUs: p50 post to notification <= 15 us',
      rows,
      (r) => r.path === `${ACROSS} + notification (polled target)` && r.pieceBytes === 64 * KiB,
      (r) => r.notifyP50us,
      (v) => v <= 15,
      (v) => `${v.toFixed(1)} us`,
      true,
    ),
  );
  // Same GPU and pinned: the rows of the largest total size measured, where a transfer's fixed cost weighs least.
  const largest = (pick: (r: ScoredRow) => boolean) => {
    const max = Math.max(0, ...rows.filter(pick).map((r) => r.bytes));
    return (r: ScoredRow) => pick(r) && r.bytes === max;
  };
  out.push(
    every(
      'same GPU across processes (largest total size): >= 90% of the device-to-device copy',
      rows,
      largest((r) => r.path === 'cuda-ipc same GPU' && isTransfer(r) && r.memory === 'device->device'),
      (r) => r.vsBaseline,
      (v) => v >= 0.9,
      pct,
    ),
  );
  out.push(
    every(
      'pinned host to device and back: >= 90% of the same copy',
      rows,
      (r) => r.path.startsWith('cuda-ipc') && isTransfer(r) && r.memory === 'pinned->device',
      (r) => r.vsBaseline,
      (v) => v >= 0.9,
      pct,
    ),
  );
  out.push(
    every(
      'prepare a 16,384-piece transfer: <= 5 ms of JS-thread time',
      rows,
      (r) => isTransfer(r) && r.pieces === 16384,
      (r) => r.prepareMs,
      (v) => v <= 5,
      (v) => `${v.toFixed(2)} ms`,
      true,
    ),
  );
  out.push(
    every(
      'post a 16,384-piece transfer again: <= 50 us of JS-thread time',
      rows,
      (r) => isTransfer(r) && r.pieces === 16384,
      (r) => r.postUs,
      (v) => v <= 50,
      (v) => `${v.toFixed(1)} us`,
      true,
    ),
  );
  const shm = every(
    'shm >= 80% of memcpy for pieces of 64 KiB and up (machines without a GPU)',
    rows,
    (r) => r.section === 'host' && r.path === 'shm' && isTransfer(r) && r.pieceBytes >= 64 * KiB,
    (r) => r.vsBaseline,
    (v) => v >= 0.8,
    pct,
  );
  const unscored = (s: TargetScore): TargetScore => (s.result === 'not measured' ? s : { ...s, result: 'not scored' });
  return [...(gpus >= 2 ? out : out.map(unscored)), gpus === 0 ? shm : unscored(shm)];
}

/** The scorecard as rows for console.table (the long row lists stay in the JSON). */
export function scoreTable(scores: TargetScore[]) {
  return scores.map((s) => ({
    target: s.target,
    result: s.result,
    measured: s.measured.length > 90 ? `${s.measured.slice(0, 87)}...` : s.measured,
  }));
}

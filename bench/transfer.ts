/**
 * npm run bench:transfer [-- --quick] [-- --json FILE] [-- --svg FILE] [-- --host-only]
 *
 * KV transfer measured between two real processes (this one initiates; a child is the target), against
 * the baselines that bound each path, measured in the same run on the same buffers:
 *   host backends (shm, tcp, ucx)    vs  memcpy of the same bytes in one process
 *   cuda-ipc, same GPU                vs  device-to-device copy (cuMemcpyAsync)
 *   cuda-ipc, across GPUs             vs  contiguous peer copy (cuMemcpyPeerAsync) and NVLink's rate,
 *                                         and NCCL send/recv of the same total size
 *   nccl backend, across GPUs         vs  NCCL send/recv of the same total size
 *   pinned host -> device and back    vs  pinned host-to-device and device-to-pinned-host copies
 * Rows: GB/s (from the p50 post-to-resolution latency), pipelined GB/s (32 posts in flight on GPU rows, 8 on
 * host rows), latency p50/p99, post-to-notification p50 where notified, JS-thread time to prepare and to post; plus registration times. Notifications are timed twice: to a target that
 * takes them as events, and to a second target process made with `notifications: 'poll'` that spins on
 * takeNotifications() while the initiator posts ("polled target" rows). Prints a table, writes --json (default
 * bench-results/transfer.json) and an SVG chart (default beside the JSON), and prints the scorecard of the
 * targets it is judged by (bench/targets.ts), also in the JSON as `targets`.
 */
import { mkdirSync, writeFileSync } from 'node:fs';
import { dirname } from 'node:path';
import { parseArgs } from 'node:util';
import {
  capabilities,
  Communicator,
  CudaDevice,
  ncclInfo,
  kvPool,
  kvTransferPieces,
  TransferAgent,
  type KvPoolSpec,
  type PieceList,
  type Region,
} from '../lib/index.js';
import { PeerProcess } from '../test/helpers/peer.js';
import { transferChart, writeChart } from './chart.js';
import { human, scoreTable, scoreTargets } from './targets.js';

const { values } = parseArgs({
  options: {
    quick: { type: 'boolean', default: false },
    json: { type: 'string', default: 'bench-results/transfer.json' },
    svg: { type: 'string' },
    'host-only': { type: 'boolean', default: false },
  },
});
const quick = values.quick!;
const jsonFile = values.json!;
const svgFile = values.svg ?? jsonFile.replace(/\.json$/, '') + '.svg';
const budgetMs = quick ? 120 : 500;
const started = performance.now();

interface Row {
  section: string;
  path: string;
  op: 'READ' | 'WRITE' | 'copy';
  memory: string;
  pieceBytes: number;
  pieces: number;
  bytes: number;
  iterations: number;
  gbps: number;
  p50us: number;
  p99us: number;
  notifyP50us?: number;
  prepareMs?: number;
  postUs?: number;
  backend?: string;
  mergedPieces?: number;
  baseline?: string;
  vsBaseline?: number;
  vsLink?: number;
  /** GB/s with several posts of the plan in flight (a run issued back to back, as the NCCL baseline is). */
  pipelinedGbps?: number;
  /** cuda-ipc and nccl rows across GPUs: pipelined GB/s over NCCL send/recv's at the same total size. */
  vsNccl?: number;
  /** cuda-ipc rows: how the plan's copies were issued once its trials were done (TransferPlan.copyStrategy). */
  copyStrategy?: string;
}

const rows: Row[] = [];
const registration: { what: string; bytes: number; ms: number }[] = [];
/** A notification alone, one way (half the round trip of one the target echoes back), in us. */
let notifyOneWay: { p50us: number; p99us: number; iterations: number } | undefined;
/** A notification alone to the polled target, one way (its arrival stamp minus the notify() call's), in us. */
let notifyPolledOneWay: { p50us: number; p99us: number; iterations: number } | undefined;

const pct = (sorted: number[], p: number) =>
  sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))]!;
/** Posts `plan` repeatedly (see sample): resolution latencies, and the JS-thread time of each post() call. */
async function timePlan(plan: { post(): Promise<void> }): Promise<{ times: number[]; postUs: number[] }> {
  // Post-to-resolution timed exactly as the baseline rows are (sample()), then the JS-thread time of the
  // post alone in separate iterations: a clock read between the post and the wait would be counted
  // in the latency of small transfers (tens of nanoseconds of 1.5 us) and not in the baseline's.
  const times = await sample(() => plan.post());
  const postUs: number[] = [];
  for (let i = 0; i < Math.min(times.length, 200); i++) {
    const a = process.hrtime.bigint();
    const pending = plan.post();
    postUs.push(Number(process.hrtime.bigint() - a) / 1e3);
    await pending;
  }
  return { times, postUs: postUs.sort((x, y) => x - y) };
}

/**
 * Operations in flight in the pipelined rows and in the NCCL baseline's runs alike, so that `vs NCCL` compares
 * like with like (it was 8 posts against 30 NCCL operations; bench/micro/depth.ts: at 1 MiB, 8 in flight cost
 * Tandem 9 us per transfer and 32 cost 6, while NCCL through the same JavaScript API stayed at 17-19 us).
 */
const inFlight = 32;

/** GB/s with `depth` posts in flight: runs of them issued back to back, p50 over runs. */
async function pipelined(plan: { post(): Promise<void>; bytes: number }, depth = inFlight): Promise<number> {
  const runs = await sample(() => Promise.all(Array.from({ length: depth }, () => plan.post())).then(() => undefined));
  return (plan.bytes * depth) / (pct(runs, 50) * 1e3);
}

/**
 * Runs `op` until the time budget is spent (at least 3, at most 1000 times) after warm-ups: 2, and more
 * for a tenth of the budget, so that microsecond operations are timed once the JIT has compiled their path.
 */
async function sample(op: () => Promise<number | void> | void): Promise<number[]> {
  const w0 = performance.now();
  for (let i = 0; i < 2 || (performance.now() - w0 < budgetMs / 10 && i < 1000); i++) await op();
  const times: number[] = [];
  const t0 = performance.now();
  while ((performance.now() - t0 < budgetMs || times.length < 3) && times.length < 1000) {
    const a = process.hrtime.bigint();
    const measured = await op();
    times.push(typeof measured === 'number' ? measured : Number(process.hrtime.bigint() - a) / 1e3);
  }
  return times.sort((x, y) => x - y);
}

function slots(count: number, total: number, seed: number): Float64Array {
  // A scattered choice of `count` distinct slots out of `total` (deterministic), so that pieces never merge.
  const out = new Float64Array(count);
  const stride = Math.max(1, Math.floor(total / count));
  for (let i = 0; i < count; i++) out[i] = (i * stride + ((i * seed) % stride)) % total;
  return out;
}

function record(row: Row) {
  rows.push(row);
  const tag = row.baseline ? ` ${(row.vsBaseline! * 100).toFixed(0)}% of ${row.baseline}` : '';
  console.error(
    `  ${row.section} | ${row.path} ${row.op} ${row.memory} ${human(row.pieceBytes)} x ${row.pieces}: ${row.gbps.toFixed(2)} GB/s${tag}`,
  );
}

const caps = await capabilities();
const target = await PeerProcess.start();
await target.request('create', { name: 'bench-target' });
const agent = await TransferAgent.create({ name: 'bench-initiator' });
// The second target: notifications taken by polling (see notifyLatencyPolled).
const polled = await PeerProcess.start();
await polled.request('create', { name: 'bench-polled', notifications: 'poll' });

/** Gives the polled target a region (host: shared; device: on `device`) and exchanges metadata again. */
async function polledRegion(device?: number): Promise<number> {
  const { region } = await polled.request<{ region: { id: number } }>(
    device === undefined ? 'allocShared' : 'allocDevice',
    device === undefined ? { bytes: 1 << 20 } : { device, bytes: 1 << 20 },
  );
  agent.loadRemote(Buffer.from((await polled.request<{ metadata: string }>('metadata')).metadata, 'base64'));
  await polled.request('load', { metadata: Buffer.from(agent.metadata()).toString('base64') });
  return region.id;
}

async function exchange() {
  const { metadata } = await target.request<{ metadata: string }>('metadata');
  const peer = agent.loadRemote(Buffer.from(metadata, 'base64'));
  await target.request('load', { metadata: Buffer.from(agent.metadata()).toString('base64') });
  return peer;
}

interface Baseline {
  name: string;
  gbpsFor: (bytes: number) => number | undefined | Promise<number | undefined>;
  link?: number;
  /** NCCL send/recv's GB/s at a total size, where measured (rows across GPUs). */
  ncclFor?: (bytes: number) => number | undefined | Promise<number | undefined>;
}

/** Prepares a plan over `pieces`, posts it repeatedly and records the row against its baseline. */
async function measurePlan(
  row: { section: string; path: string; memory: string; op: 'READ' | 'WRITE'; pieceBytes: number },
  local: Region,
  remote: number,
  pieces: PieceList,
  backend: string | undefined,
  baseline?: Baseline,
) {
  const p0 = performance.now();
  const plan = agent.prepare({
    op: row.op,
    peer: 'bench-target',
    local,
    remote,
    pieces,
    ...(backend ? { backend: backend as 'shm' } : {}),
  });
  const prepareMs = performance.now() - p0;
  const { times, postUs } = await timePlan(plan);
  const p50 = pct(times, 50);
  const gbps = plan.bytes / (p50 * 1e3);
  // Host rows keep 8 in flight: 32 would spend minutes on the slow backends' large rows (tcp, ucx).
  const pipelinedGbps = await pipelined(plan, row.section === 'host' ? 8 : inFlight);
  const base = await baseline?.gbpsFor(plan.bytes);
  const nccl = await baseline?.ncclFor?.(plan.bytes);
  record({
    ...row,
    pieces: plan.requestedPieces,
    bytes: plan.bytes,
    iterations: times.length,
    gbps,
    p50us: p50,
    p99us: pct(times, 99),
    prepareMs,
    postUs: pct(postUs, 50),
    backend: plan.backend,
    mergedPieces: plan.pieces,
    ...(base ? { baseline: baseline!.name, vsBaseline: gbps / base } : {}),
    ...(baseline?.link ? { vsLink: gbps / baseline.link } : {}),
    pipelinedGbps,
    ...(nccl ? { vsNccl: pipelinedGbps / nccl } : {}),
    ...(plan.copyStrategy ? { copyStrategy: plan.copyStrategy } : {}),
  });
}

/** One sweep point: `count` scattered pieces of `pieceBytes` that never merge. */
function sweepPlan(
  section: string,
  path: string,
  memory: string,
  local: Region,
  remote: number,
  op: 'READ' | 'WRITE',
  pieceBytes: number,
  count: number,
  capacity: number,
  backend: string | undefined,
  baseline?: Baseline,
) {
  const localOffsets = slots(count, Math.floor(capacity / pieceBytes), 7);
  const remoteOffsets = slots(count, Math.floor(capacity / pieceBytes), 13).reverse();
  for (let i = 0; i < count; i++) {
    localOffsets[i]! *= pieceBytes;
    remoteOffsets[i]! *= pieceBytes;
  }
  return measurePlan(
    { section, path, memory, op, pieceBytes },
    local,
    remote,
    { localOffsets, remoteOffsets, lengths: pieceBytes },
    backend,
    baseline,
  );
}

/**
 * The notification path alone, with no data: this process notifies the target, whose fixture sends it
 * straight back (JS -> agent thread -> socket -> peer's reader -> peer's JS, twice). Half the round trip
 * is what a notification adds to a transfer's completion.
 */
async function notifyRoundTrip() {
  let n = 0;
  const times = await sample(async () => {
    const text = `echo:${n++}`;
    const back = agent.waitForNotification({ from: 'bench-target', match: (m) => m.toString('latin1') === text });
    await agent.notify('bench-target', text);
    await back;
  });
  return { p50us: pct(times, 50) / 2, p99us: pct(times, 99) / 2, iterations: times.length };
}

/** One notification row's case: the 64 KiB WRITE's memory and the row's labels. */
interface NotifyCase {
  section: string;
  path: string;
  memory: string;
  local: Region;
  remote: number;
  backend?: string;
}

async function notifyLatency({ section, path, memory, local, remote, backend }: NotifyCase) {
  const plan = notifyPlan('bench-target', local, remote, backend);
  let n = 0;
  const notify: number[] = [];
  const times = await sample(async () => {
    const note = `n${n++}`;
    const seen = target.nextEvent((e) => e.event === 'notification' && e.text === note);
    const t0 = process.hrtime.bigint();
    await plan.post({ notify: note });
    const e = await seen;
    notify.push(Number(BigInt(e.t!) - t0) / 1e3);
  });
  notify.sort((x, y) => x - y);
  recordNotify(section, `${path} + notification`, memory, times, notify, plan.backend);
}

/** One 64 KiB WRITE from the start of `local` to the start of `remote` at `peer`. */
function notifyPlan(peer: string, local: Region, remote: number, backend?: string) {
  return agent.prepare({
    op: 'WRITE',
    peer,
    local,
    remote,
    pieces: { localOffsets: Float64Array.of(0), remoteOffsets: Float64Array.of(0), lengths: 64 << 10 },
    ...(backend ? { backend: backend as 'shm' } : {}),
  });
}

/** A notification row: post-to-resolution `times` and post-to-notification `notify` (sorted, us). */
function recordNotify(
  section: string,
  path: string,
  memory: string,
  times: number[],
  notify: number[],
  backend: string,
) {
  record({
    section,
    path,
    op: 'WRITE',
    memory,
    pieceBytes: 64 << 10,
    pieces: 1,
    bytes: 64 << 10,
    iterations: times.length,
    gbps: (64 << 10) / (pct(times, 50) * 1e3),
    p50us: pct(times, 50),
    p99us: pct(times, 99),
    notifyP50us: pct(notify, 50),
    backend,
  });
}

/**
 * Post to notification with a target that polls: the polled target spins on takeNotifications() (nothing
 * else runs in it meanwhile) and stamps each notification as it takes it, while this process posts one
 * 64 KiB WRITE with a notification at a time, each awaited, as notifyLatency does. Then the same number of
 * notifications alone, 30 us apart. Stamps are CLOCK_MONOTONIC in both processes. The spinning target
 * takes a core: on a machine with few cores its figures measure the scheduler more than the path.
 */
async function notifyLatencyPolled({ section, path, memory, local, remote, backend }: NotifyCase) {
  const plan = notifyPlan('bench-polled', local, remote, backend);
  for (let i = 0; i < 10; i++) await plan.post(); // connection, mappings, the copy strategy's trials
  const count = quick ? 300 : 1000;
  const spin = polled.request<{ notifications: { text: string; t: string }[] }>('spin', {
    count: 2 * count,
    timeoutMs: 60_000,
  });
  await polled.nextEvent((e) => e.event === 'spinning');
  const sentAt = new Map<string, bigint>();
  const times: number[] = [];
  for (let i = 0; i < count; i++) {
    const note = `p${i}`;
    const t0 = process.hrtime.bigint();
    sentAt.set(note, t0);
    await plan.post({ notify: note });
    times.push(Number(process.hrtime.bigint() - t0) / 1e3);
  }
  for (let i = 0; i < count; i++) {
    const note = `a${i}`;
    const t0 = process.hrtime.bigint();
    sentAt.set(note, t0);
    await agent.notify('bench-polled', note);
    // One at a time: a notify() that completes during the call would otherwise queue them up faster than
    // one is taken, and time the queue.
    while (process.hrtime.bigint() - t0 < 30_000n);
  }
  const { notifications } = await spin;
  const latency = (prefix: string) =>
    notifications
      .filter((n) => n.text.startsWith(prefix) && sentAt.has(n.text))
      .map((n) => Number(BigInt(n.t) - sentAt.get(n.text)!) / 1e3)
      .sort((x, y) => x - y);
  const withData = latency('p');
  const alone = latency('a');
  if (withData.length !== count || alone.length !== count) {
    throw new Error(`polled target took ${withData.length + alone.length} of ${2 * count} notifications`);
  }
  times.sort((x, y) => x - y);
  recordNotify(section, `${path} + notification (polled target)`, memory, times, withData, plan.backend);
  notifyPolledOneWay ??= { p50us: pct(alone, 50), p99us: pct(alone, 99), iterations: count };
}

let polledHost: number | undefined;

// ------------------------------------------------------------------------------------------------
// Host memory: shm, tcp (and ucx where the agent offers it) against memcpy in one process.
{
  const capacity = quick ? 64 << 20 : 256 << 20;
  let t = performance.now();
  const local = agent.allocShared(capacity);
  registration.push({ what: 'allocShared', bytes: capacity, ms: performance.now() - t });
  local.view!.fill(1);
  const scratch = agent.allocShared(capacity);
  const plain = Buffer.alloc(capacity);
  t = performance.now();
  agent.deregister(agent.registerHost(plain));
  registration.push({ what: 'registerHost', bytes: capacity, ms: performance.now() - t });
  const remote = (await target.request<{ region: { id: number } }>('allocShared', { bytes: capacity })).region.id;
  await exchange();

  const memcpy = new Map<number, number>();
  const memcpyFor = (bytes: number) => memcpy.get(bytes);
  const sizes = quick ? [64 << 10, 1 << 20] : [4 << 10, 64 << 10, 1 << 20, 16 << 20, 64 << 20];
  const counts = quick ? [1, 256] : [1, 16, 256, 4096, 16384];
  const totals = new Set<number>();
  for (const s of sizes) for (const c of counts) if (s * c <= capacity) totals.add(s * c);
  for (const bytes of totals) {
    const src = local.view!.subarray(0, bytes);
    const dst = scratch.view!.subarray(0, bytes);
    const times = await sample(() => void dst.set(src));
    const gbps = bytes / (pct(times, 50) * 1e3);
    memcpy.set(bytes, gbps);
    record({
      section: 'host',
      path: 'memcpy (one process)',
      op: 'copy',
      memory: 'host',
      pieceBytes: bytes,
      pieces: 1,
      bytes,
      iterations: times.length,
      gbps,
      p50us: pct(times, 50),
      p99us: pct(times, 99),
    });
  }
  const backends = ['shm', 'tcp', ...(agent.backends.includes('ucx') ? ['ucx'] : [])];
  for (const backend of backends) {
    for (const op of ['WRITE', 'READ'] as const) {
      for (const s of sizes) {
        for (const c of counts) {
          if (s * c > capacity || (quick && backend === 'tcp' && s * c > 16 << 20)) continue;
          await sweepPlan('host', backend, 'shared->shared', local, remote, op, s, c, capacity, backend, {
            name: 'memcpy',
            gbpsFor: memcpyFor,
          });
        }
      }
    }
    await notifyLatency({ section: 'host', path: backend, memory: 'shared->shared', local, remote, backend });
    if (!notifyOneWay) notifyOneWay = await notifyRoundTrip();
    polledHost ??= await polledRegion();
    await notifyLatencyPolled({
      section: 'host',
      path: backend,
      memory: 'shared->shared',
      local,
      remote: polledHost,
      backend,
    });
  }
  agent.deregister(local);
  agent.deregister(scratch);
}

// ------------------------------------------------------------------------------------------------
// GPU memory: cuda-ipc on one GPU and across two, KV-shaped cases, pinned host.
if (caps.cuda.available && !values['host-only']) {
  const gpus = caps.cuda.devices.length;
  const capacity = quick ? 512 << 20 : 1536 << 20;
  const dev0 = await CudaDevice.open(0);
  const dev1 = gpus > 1 ? await CudaDevice.open(1) : undefined;
  const localBuf = await dev0.alloc(capacity);
  await localBuf.fill(3);
  let t = performance.now();
  const local = agent.registerDevice(localBuf);
  registration.push({ what: 'registerDevice', bytes: capacity, ms: performance.now() - t });
  const scratch0 = await dev0.alloc(capacity);
  const scratch1 = dev1 ? await dev1.alloc(capacity) : undefined;
  t = performance.now();
  const pinned = agent.allocPinned(quick ? 256 << 20 : 1 << 30);
  registration.push({ what: 'allocPinned', bytes: pinned.size, ms: performance.now() - t });

  const sizes = quick ? [64 << 10, 1 << 20] : [4 << 10, 64 << 10, 1 << 20, 16 << 20, 64 << 20];
  const counts = quick ? [1, 256, 4096] : [1, 16, 256, 4096, 16384];

  // Baselines, per total size, measured with CUDA events.
  const timed = async (
    dst: { address: bigint; device: number },
    src: { address: bigint; device: number },
    bytes: number,
  ) => {
    const ms = await dev0.timeCopy(dst, src, bytes, quick ? 10 : 30);
    ms.sort((a, b) => a - b);
    return bytes / (pct(ms, 50) * 1e6);
  };
  // Each baseline is measured once per total size, the first time a row needs it (and for the sweep's
  // sizes up front, so that they appear as their own rows).
  const cache = new Map<string, number>();
  const baselineRow = async (
    name: string,
    memory: string,
    bytes: number,
    dst: { address: bigint; device: number },
    src: { address: bigint; device: number },
  ) => {
    const key = `${name}/${bytes}`;
    if (!cache.has(key)) {
      const gbps = await timed(dst, src, bytes);
      cache.set(key, gbps);
      record({
        section: 'gpu',
        path: name,
        op: 'copy',
        memory,
        pieceBytes: bytes,
        pieces: 1,
        bytes,
        iterations: quick ? 10 : 30,
        gbps,
        p50us: bytes / gbps / 1e3,
        p99us: 0,
      });
    }
    return cache.get(key)!;
  };
  const d2dFor = (bytes: number) =>
    bytes > capacity
      ? undefined
      : baselineRow(
          'device-to-device copy (same GPU)',
          'device',
          bytes,
          { address: scratch0.address, device: 0 },
          { address: localBuf.address, device: 0 },
        );
  const peerFor = (bytes: number) =>
    !scratch1 || bytes > capacity
      ? undefined
      : baselineRow(
          'peer copy GPU0->GPU1 (cuMemcpyPeerAsync)',
          'device',
          bytes,
          { address: scratch1.address, device: 1 },
          { address: localBuf.address, device: 0 },
        );
  const h2dFor = (bytes: number) =>
    bytes > pinned.size
      ? undefined
      : baselineRow(
          'pinned host-to-device copy',
          'pinned->device',
          bytes,
          { address: scratch0.address, device: 0 },
          { address: pinned.address, device: -1 },
        );
  const d2hFor = (bytes: number) =>
    bytes > pinned.size
      ? undefined
      : baselineRow(
          'device-to-pinned-host copy',
          'device->pinned',
          bytes,
          { address: pinned.address, device: -1 },
          { address: scratch0.address, device: 0 },
        );
  // NCCL send/recv GPU0 -> GPU1 on the same buffers as the peer copy: two ranks of one communicator in
  // this process (NCCL's P2P transport, as between processes), timed as nccl-tests does: a run of
  // `inFlight` operations issued back to back, wall time over the count. Issued through Tandem's
  // Communicator, as a Node program would: at 1 MiB that costs the JS thread about 15 us per operation,
  // and NCCL issued from C++ moves 1 MiB operations about 1.5x as fast (bench/micro/nccl_ops.cu sendrecv).
  const nccl = gpus > 1 ? await ncclInfo() : undefined;
  const ncclRanks = nccl?.available
    ? await Communicator.initAll({ devices: [0, 1], name: 'bench-baseline', timeoutMs: 60_000 })
    : undefined;
  const ncclFor = async (bytes: number) => {
    if (!ncclRanks || !scratch1 || bytes > capacity) return undefined;
    const key = `nccl/${bytes}`;
    if (!cache.has(key)) {
      const [c0, c1] = ncclRanks as [Communicator, Communicator];
      const once = (n: number) => {
        const all: Promise<void>[] = [];
        for (let i = 0; i < n; i++) {
          all.push(
            c0.send({ buffer: localBuf, peer: 1, dtype: 'uint8', count: bytes }),
            c1.recv({ buffer: scratch1, peer: 0, dtype: 'uint8', count: bytes }),
          );
        }
        return Promise.all(all);
      };
      await once(3);
      const n = inFlight;
      const runs: number[] = [];
      for (let r = 0; r < 5; r++) {
        const t0 = performance.now();
        await once(n);
        runs.push(((performance.now() - t0) * 1e3) / n);
      }
      runs.sort((a, b) => a - b);
      const us = pct(runs, 50);
      cache.set(key, bytes / (us * 1e3));
      record({
        section: 'gpu',
        path: 'NCCL send/recv GPU0->GPU1 (back to back)',
        op: 'copy',
        memory: 'device',
        pieceBytes: bytes,
        pieces: 1,
        bytes,
        iterations: n * 5,
        gbps: bytes / (us * 1e3),
        p50us: us,
        p99us: runs[runs.length - 1]!,
      });
    }
    return cache.get(key)!;
  };
  const totals = new Set<number>([64 << 10, 1 << 20]);
  for (const s of sizes) for (const c of counts) if (s * c <= capacity) totals.add(s * c);
  if (ncclRanks) totals.add(1 << 30);
  for (const bytes of [...totals].sort((a, b) => a - b)) {
    await d2dFor(bytes);
    await peerFor(bytes);
    await h2dFor(bytes);
    await d2hFor(bytes);
    await ncclFor(bytes);
  }
  const link = caps.cuda.nvlink.bandwidthGBps[0]?.[1] || undefined;

  const placements: [string, number][] = [
    ['same GPU', 0],
    ...(gpus > 1 ? ([['GPU0->GPU1', 1]] as [string, number][]) : []),
  ];
  for (const [placement, remoteGpu] of placements) {
    const remote = (
      await target.request<{ region: { id: number } }>('allocDevice', { device: remoteGpu, bytes: capacity })
    ).region.id;
    const peer = await exchange();
    // What a first transfer would otherwise pay (CUDA IPC open of the peer's region, kernel load), then
    // the first post after it.
    let t = performance.now();
    await agent.warmup(peer.name);
    registration.push({ what: `warmup, ${placement} (agent.warmup)`, bytes: capacity, ms: performance.now() - t });
    const first = agent.prepare({
      op: 'WRITE',
      peer: peer.name,
      local,
      remote,
      pieces: { localOffsets: Float64Array.of(0), remoteOffsets: Float64Array.of(0), lengths: 64 << 10 },
    });
    t = performance.now();
    await first.post();
    registration.push({
      what: `first 64 KiB post after warmup, ${placement}`,
      bytes: 64 << 10,
      ms: performance.now() - t,
    });
    const baseline =
      remoteGpu === 0
        ? { name: 'device-to-device copy', gbpsFor: d2dFor }
        : { name: 'peer copy', gbpsFor: peerFor, ncclFor, ...(link ? { link } : {}) };
    for (const op of ['WRITE', 'READ'] as const) {
      for (const s of sizes) {
        for (const c of counts) {
          if (s * c > capacity) continue;
          await sweepPlan(
            'gpu',
            `cuda-ipc ${placement}`,
            'device->device',
            local,
            remote,
            op,
            s,
            c,
            capacity,
            undefined,
            baseline,
          );
        }
      }
    }
    await notifyLatency({ section: 'gpu', path: `cuda-ipc ${placement}`, memory: 'device->device', local, remote });
    const polledRemote = await polledRegion(remoteGpu);
    await agent.warmup('bench-polled');
    await notifyLatencyPolled({
      section: 'gpu',
      path: `cuda-ipc ${placement}`,
      memory: 'device->device',
      local,
      remote: polledRemote,
    });
    if (remoteGpu !== 0 && agent.backends.includes('nccl')) {
      // The nccl backend (for GPU pairs that CUDA IPC cannot reach) on the same pair, against NCCL itself.
      const ncclBaseline = { name: 'NCCL send/recv', gbpsFor: ncclFor, ncclFor };
      const points: [number, number][] = quick
        ? [
            [1 << 20, 1],
            [64 << 10, 256],
            [64 << 20, 1],
          ]
        : [
            [64 << 10, 1],
            [1 << 20, 1],
            [16 << 20, 1],
            [64 << 20, 1],
            [64 << 20, 16],
            [64 << 10, 256],
            [64 << 10, 4096],
          ];
      for (const op of ['WRITE', 'READ'] as const) {
        for (const [s, c] of points) {
          if (s * c > capacity) continue;
          await sweepPlan(
            'gpu',
            `nccl ${placement}`,
            'device->device',
            local,
            remote,
            op,
            s,
            c,
            capacity,
            'nccl',
            ncclBaseline,
          );
        }
      }
      await notifyLatency({
        section: 'gpu',
        path: `nccl ${placement}`,
        memory: 'device->device',
        local,
        remote,
        backend: 'nccl',
      });
    }
    // Pinned host memory here, device memory at the target: a WRITE moves host to device, a READ back.
    for (const op of ['WRITE', 'READ'] as const) {
      await sweepPlan(
        'gpu',
        `cuda-ipc ${placement}`,
        'pinned->device',
        pinned,
        remote,
        op,
        64 << 20,
        1,
        pinned.size,
        undefined,
        op === 'WRITE'
          ? { name: 'pinned host-to-device copy', gbpsFor: h2dFor }
          : { name: 'device-to-pinned-host copy', gbpsFor: d2hFor },
      );
    }

    // KV-shaped: the KV of a 4,096-token prompt (bf16, 16-token blocks).
    const shapes: [string, Omit<KvPoolSpec, 'numBlocks' | 'layout'>][] = [
      ['Llama-3.1-8B', { layers: 32, kvHeads: 8, headDim: 128, blockSize: 16, dtype: 'bf16' }],
      ['Llama-3.1-70B', { layers: 80, kvHeads: 8, headDim: 128, blockSize: 16, dtype: 'bf16' }],
    ];
    const blocks = 4096 / 16;
    for (const [model, shape] of shapes) {
      for (const layout of ['block-major', 'layer-major'] as const) {
        const pool = kvPool({
          ...shape,
          layout,
          numBlocks: Math.floor(capacity / kvPool({ ...shape, layout, numBlocks: 1 }).blockBytes),
        });
        if (pool.numBlocks < blocks) continue;
        const srcIds = Uint32Array.from({ length: blocks }, (_, i) => (i * 7) % pool.numBlocks);
        const dstIds = Uint32Array.from({ length: blocks }, (_, i) => pool.numBlocks - 1 - ((i * 11) % pool.numBlocks));
        const p = kvTransferPieces(pool, pool, srcIds, dstIds);
        await measurePlan(
          {
            section: 'kv',
            path: `cuda-ipc ${placement} ${model} ${layout}`,
            memory: 'device->device',
            op: 'WRITE',
            pieceBytes: Math.round(p.bytes / p.pieces),
          },
          local,
          remote,
          p,
          undefined,
          baseline,
        );
      }
    }
    // Heterogeneous TP: prefill TP2 (rank 0 holds 4 of 8 heads) into decode TP1, HND tiles.
    {
      const shape = {
        layers: 32,
        kvHeads: 8,
        headDim: 128,
        blockSize: 16,
        dtype: 'bf16' as const,
        layout: 'layer-major' as const,
        headLayout: 'HND' as const,
      };
      const dst = kvPool({ ...shape, numBlocks: Math.floor(capacity / kvPool({ ...shape, numBlocks: 1 }).blockBytes) });
      const src = kvPool({
        ...shape,
        tpSize: 2,
        tpRank: 0,
        numBlocks: Math.floor(capacity / kvPool({ ...shape, tpSize: 2, numBlocks: 1 }).blockBytes),
      });
      const srcIds = Uint32Array.from({ length: blocks }, (_, i) => i);
      const dstIds = Uint32Array.from({ length: blocks }, (_, i) => (i * 5 + 3) % dst.numBlocks);
      const p = kvTransferPieces(src, dst, srcIds, dstIds);
      await measurePlan(
        {
          section: 'kv',
          path: `cuda-ipc ${placement} Llama-3.1-8B TP2->TP1 head slice`,
          memory: 'device->device',
          op: 'WRITE',
          pieceBytes: Math.round(p.bytes / p.pieces),
        },
        local,
        remote,
        p,
        undefined,
        baseline,
      );
    }
  }
  await agent.dispose();
  for (const c of ncclRanks ?? []) await c.dispose();
  await Promise.all([dev0.dispose(), dev1?.dispose()]);
} else {
  await agent.dispose();
}
await Promise.all([target.stop(), polled.stop()]);

// ------------------------------------------------------------------------------------------------
const table = rows.map((r) => ({
  section: r.section,
  path: r.path,
  op: r.op,
  memory: r.memory,
  piece: human(r.pieceBytes),
  pieces: r.pieces,
  total: human(r.bytes),
  'GB/s': r.gbps.toFixed(2),
  'p50 us': r.p50us.toFixed(1),
  'p99 us': r.p99us.toFixed(1),
  'notify p50 us': r.notifyP50us?.toFixed(1) ?? '',
  'prepare ms': r.prepareMs?.toFixed(3) ?? '',
  'post us': r.postUs?.toFixed(1) ?? '',
  'vs baseline': r.vsBaseline === undefined ? '' : `${(r.vsBaseline * 100).toFixed(0)}% of ${r.baseline}`,
  'vs link': r.vsLink === undefined ? '' : `${(r.vsLink * 100).toFixed(0)}%`,
  'pipelined GB/s': r.pipelinedGbps?.toFixed(2) ?? '',
  'vs NCCL': r.vsNccl === undefined ? '' : `${r.vsNccl.toFixed(2)}x`,
  copy: r.copyStrategy ?? '',
}));
console.log(
  `host: ${caps.cpu.cores} cores; CUDA: ${caps.cuda.available ? caps.cuda.devices.map((d) => d.name).join(', ') : `unavailable (${caps.cuda.reason})`}`,
);
console.table(table);
console.table(registration.map((r) => ({ registration: r.what, size: human(r.bytes), ms: r.ms.toFixed(3) })));
if (notifyOneWay) {
  console.log(
    `notification alone, one way (round trip / 2, ${notifyOneWay.iterations} round trips): p50 ${notifyOneWay.p50us.toFixed(1)} us, p99 ${notifyOneWay.p99us.toFixed(1)} us`,
  );
}
if (notifyPolledOneWay) {
  console.log(
    `notification alone to the polled target, one way (${notifyPolledOneWay.iterations}): p50 ${notifyPolledOneWay.p50us.toFixed(1)} us, p99 ${notifyPolledOneWay.p99us.toFixed(1)} us`,
  );
}
const targets = scoreTargets(rows, caps.cuda.available ? caps.cuda.devices.length : 0);
console.log(`targets${quick ? ' (--quick: fewer rows, shorter runs; the full sweep is the one to judge by)' : ''}:`);
console.table(scoreTable(targets));
mkdirSync(dirname(jsonFile), { recursive: true });
writeFileSync(
  jsonFile,
  JSON.stringify(
    {
      host: caps,
      quick,
      seconds: (performance.now() - started) / 1e3,
      rows,
      registration,
      notifyOneWay,
      notifyPolledOneWay,
      targets,
    },
    null,
    2,
  ),
);
await writeChart(
  svgFile,
  transferChart(
    rows,
    `Tandem bench:transfer${quick ? ' --quick' : ''}`,
    `${caps.cuda.available ? caps.cuda.devices.map((d) => d.name).join(' + ') : `no GPU, ${caps.cpu.cores}-core CPU`}; ` +
      'WRITE, GB/s from the p50 latency of one transfer (READ and pipelined rows in the JSON)',
  ),
);
console.log(`wrote ${jsonFile} and ${svgFile} in ${((performance.now() - started) / 1e3).toFixed(1)} s`);

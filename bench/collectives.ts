/**
 * npm run bench:collectives [-- --quick] [-- --json FILE] [-- --ranks N] [-- --dtype float32|bfloat16|float16]
 *                           [-- --ops allReduce,allGather,...] [-- --sizes 1MiB,16MiB,...]
 *                           [-- --torch-nccl bundled|ours] [-- --rounds N]
 *
 * Bus bandwidth and per-call latency of Tandem's NCCL collectives, one process per GPU, beside the same
 * operations through PyTorch's torch.distributed (NCCL backend) on the same GPUs in the same run, where
 * python3 can import torch. Method, identical on both sides (bench/collectives_torch.py is the PyTorch
 * half): for each operation and size, warm up, then
 *   - bandwidth: after a barrier, issue `iters` operations back to back and wait for the last; time per
 *     operation = elapsed / iters; the median of `reps` such runs. algbw = size / time, busbw = algbw x
 *     the nccl-tests factor (allReduce 2(n-1)/n; allGather, reduceScatter, allToAll (n-1)/n; broadcast,
 *     reduce, sendRecv 1). `size` as nccl-tests counts it: the larger of the two buffers.
 *   - latency: issue one operation and wait for it to complete on the GPU (Tandem: the Promise settles;
 *     PyTorch: torch.cuda.synchronize()); the median over `latencyIters` calls.
 * The two sides run alternately, `--rounds` times each (default 2; 1 with --quick): Tandem, PyTorch,
 * Tandem, PyTorch. Each row keeps each side's best bandwidth and lowest latency over its rounds, so that
 * drift between the halves of a run (clocks, temperature, other tenants) does not decide a row.
 * Targets (issue "NCCL collectives for TypeScript workers"): busbw within 5% of PyTorch at every size from
 * 1 MiB up, and at most 10 us of extra latency per call below 1 MiB.
 *
 * PyTorch uses the NCCL its wheel bundles (`--torch-nccl bundled`, the default) or, with `--torch-nccl ours`,
 * the library Tandem loaded (LD_PRELOAD), so that both sides run the same NCCL build. NCCL_NVLS_ENABLE=0 is
 * set for every rank process unless the environment sets it.
 */
import { spawn, spawnSync } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { parseArgs } from 'node:util';
import {
  Communicator,
  busBandwidthFactor,
  capabilities,
  createUniqueId,
  ncclInfo,
  type DeviceMemory,
  type Dtype,
} from '../lib/index.js';
import { packageRoot } from '../lib/native/paths.js';
import { DTYPE_BYTES, makePlan, OPS, parseSize, type BenchDtype, type BenchOp, type Plan } from './collectives-plan.js';

/** One rank-0 measurement, from either side. */
interface Measurement {
  op: BenchOp;
  bytes: number;
  timeUs: number;
  algbwGBps: number;
  busbwGBps: number;
  latencyUs?: number;
}

const { values } = parseArgs({
  options: {
    quick: { type: 'boolean', default: false },
    json: { type: 'string' },
    ranks: { type: 'string', default: '2' },
    dtype: { type: 'string', default: 'float32' },
    ops: { type: 'string' },
    sizes: { type: 'string' },
    'torch-nccl': { type: 'string', default: 'bundled' },
    rounds: { type: 'string' },
    // Internal: this process is one rank.
    worker: { type: 'boolean', default: false },
    rank: { type: 'string' },
    id: { type: 'string' },
    plan: { type: 'string' },
  },
});

const MiB = 1 << 20;
const human = (b: number) =>
  b >= 1 << 30 ? `${b / (1 << 30)} GiB` : b >= MiB ? `${b / MiB} MiB` : b >= 1024 ? `${b / 1024} KiB` : `${b} B`;
const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;

// ---------------------------------------------------------------------------------------------------
// One rank (a child process).

async function runRank(rank: number, id: Uint8Array, plan: Plan): Promise<void> {
  const n = plan.ranks;
  const comm = await Communicator.init({ id, rank, size: n, device: rank, name: 'bench', timeoutMs: 300_000 });
  const maxBytes = Math.max(...plan.entries.map((e) => e.bytes));
  const send = await comm.alloc(maxBytes);
  const recv = await comm.alloc(maxBytes);
  const tiny = await comm.alloc(8);
  await Promise.all([send.fill(0), recv.fill(0), tiny.fill(0)]);
  const dtype = plan.dtype as Dtype;
  const view = (b: typeof send, bytes: number): DeviceMemory => ({ device: comm.device, address: b.address, bytes });
  const barrier = () => comm.allReduce({ send: tiny, dtype: 'float32' });
  const next = (rank + 1) % n;
  const prev = (rank - 1 + n) % n;

  const make = (op: BenchOp, bytes: number): (() => Promise<void>) => {
    const s = view(send, bytes);
    const r = view(recv, bytes);
    const part = view(send, bytes / n);
    switch (op) {
      case 'allReduce':
        return () => comm.allReduce({ send: s, dtype });
      case 'allGather':
        return () => comm.allGather({ send: part, recv: r, dtype });
      case 'reduceScatter':
        return () => comm.reduceScatter({ send: s, recv: view(recv, bytes / n), dtype });
      case 'broadcast':
        return () => comm.broadcast({ recv: s, root: 0, dtype });
      case 'reduce':
        return () => comm.reduce({ send: s, root: 0, dtype });
      case 'allToAll':
        return () => comm.allToAll({ send: s, recv: r, dtype });
      case 'sendRecv':
        return () =>
          comm.group(() => {
            void comm.send({ buffer: s, peer: next, dtype });
            void comm.recv({ buffer: r, peer: prev, dtype });
          });
    }
  };

  const rows: Measurement[] = [];
  for (const e of plan.entries) {
    const run = make(e.op, e.bytes);
    for (let i = 0; i < e.warmup; i++) await run();
    const perOp: number[] = [];
    for (let rep = 0; rep < e.reps; rep++) {
      await barrier();
      const t0 = process.hrtime.bigint();
      const pending: Promise<void>[] = [];
      for (let i = 0; i < e.iters; i++) pending.push(run());
      await Promise.all(pending);
      perOp.push(Number(process.hrtime.bigint() - t0) / 1e3 / e.iters);
    }
    const timeUs = median(perOp);
    const algbw = e.bytes / (timeUs * 1e3);
    const row: Measurement = {
      op: e.op,
      bytes: e.bytes,
      timeUs,
      algbwGBps: algbw,
      busbwGBps: algbw * busBandwidthFactor(e.op, n),
    };
    if (e.latencyIters > 0) {
      await barrier();
      const lat: number[] = [];
      for (let i = 0; i < e.latencyIters; i++) {
        const t0 = process.hrtime.bigint();
        await run();
        lat.push(Number(process.hrtime.bigint() - t0) / 1e3);
      }
      row.latencyUs = median(lat);
    }
    rows.push(row);
  }
  await comm.dispose();
  if (rank === 0) process.stdout.write(`TANDEM_ROWS ${JSON.stringify(rows)}\n`);
}

// ---------------------------------------------------------------------------------------------------
// The driver.

function rankEnv(extra: NodeJS.ProcessEnv = {}): NodeJS.ProcessEnv {
  return { ...process.env, NCCL_NVLS_ENABLE: process.env.NCCL_NVLS_ENABLE ?? '0', ...extra };
}

/** Runs one process per rank; resolves with rank 0's rows. Bounded by `limitMs`. */
function runRanks(
  label: string,
  argv: (rank: number) => [string, string[]],
  ranks: number,
  limitMs: number,
  env: NodeJS.ProcessEnv = rankEnv(),
): Promise<Measurement[]> {
  return new Promise((resolve, reject) => {
    let rows: Measurement[] | undefined;
    let stderr = '';
    let exited = 0;
    let failed = false;
    const children = Array.from({ length: ranks }, (_, rank) => {
      const [cmd, args] = argv(rank);
      const child = spawn(cmd, args, { cwd: packageRoot, env, stdio: ['ignore', 'pipe', 'pipe'] });
      child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
      createInterface({ input: child.stdout }).on('line', (line) => {
        if (line.startsWith('TANDEM_ROWS ')) rows = JSON.parse(line.slice('TANDEM_ROWS '.length)) as Measurement[];
      });
      child.on('exit', (code, signal) => {
        exited++;
        if ((code !== 0 || signal) && !failed) {
          failed = true;
          for (const c of children) c.kill('SIGKILL');
          clearTimeout(timer);
          reject(new Error(`${label}: rank ${rank} exited with ${signal ?? code}\n${stderr.slice(-4000)}`));
        } else if (exited === ranks && !failed) {
          clearTimeout(timer);
          if (rows) resolve(rows);
          else reject(new Error(`${label}: rank 0 reported nothing\n${stderr.slice(-4000)}`));
        }
      });
      return child;
    });
    const timer = setTimeout(() => {
      failed = true;
      for (const c of children) c.kill('SIGKILL');
      reject(new Error(`${label}: did not finish within ${limitMs / 1000} s\n${stderr.slice(-4000)}`));
    }, limitMs);
  });
}

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.on('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const address = server.address();
      server.close(() => resolve(typeof address === 'object' && address ? address.port : 29500));
    });
  });
}

interface TorchInfo {
  available: boolean;
  reason?: string;
  version?: string;
  ncclVersion?: string;
  devices?: number;
}

function probeTorch(env: NodeJS.ProcessEnv): TorchInfo {
  const r = spawnSync(
    'python3',
    [
      '-c',
      'import json, torch, torch.distributed as d; ' +
        'v = torch.cuda.nccl.version() if torch.cuda.is_available() else None; ' +
        'print(json.dumps({"version": torch.__version__, "devices": torch.cuda.device_count(), ' +
        '"nccl": ".".join(map(str, v)) if isinstance(v, tuple) else v, "dist": d.is_available() and d.is_nccl_available()}))',
    ],
    { encoding: 'utf8', timeout: 120_000, env },
  );
  if (r.error) return { available: false, reason: `python3 could not be run: ${r.error.message}` };
  if (r.status !== 0)
    return { available: false, reason: `python3 cannot import torch: ${r.stderr.trim().split('\n').pop()}` };
  const info = JSON.parse(r.stdout.trim().split('\n').pop()!) as {
    version: string;
    devices: number;
    nccl?: string;
    dist: boolean;
  };
  if (!info.dist) return { available: false, reason: `torch ${info.version} has no NCCL backend` };
  return {
    available: true,
    version: info.version,
    devices: info.devices,
    ...(info.nccl ? { ncclVersion: info.nccl } : {}),
  };
}

async function main(): Promise<void> {
  if (values.worker) {
    await runRank(
      Number(values.rank),
      new Uint8Array(Buffer.from(values.id!, 'base64')),
      JSON.parse(values.plan!) as Plan,
    );
    return;
  }
  const quick = values.quick ?? false;
  const ranks = Number(values.ranks);
  const dtype = values.dtype as BenchDtype;
  if (!(dtype in DTYPE_BYTES)) throw new Error(`--dtype must be one of ${Object.keys(DTYPE_BYTES).join(', ')}`);
  const ops = (values.ops ? values.ops.split(',') : [...OPS]) as BenchOp[];
  for (const op of ops) if (!OPS.includes(op)) throw new Error(`unknown op ${op}; one of ${OPS.join(', ')}`);

  const caps = await capabilities();
  const nccl = await ncclInfo();
  const gpus = caps.cuda.available ? caps.cuda.devices.length : 0;
  const hostLine = `host: ${caps.cpu.cores} cores; GPUs: ${caps.cuda.available ? caps.cuda.devices.map((d) => d.name).join(', ') : `none (${caps.cuda.reason})`}; NCCL ${nccl.available ? `${nccl.version} (${nccl.libraryPath})` : `unavailable (${nccl.reason})`}`;
  console.log(hostLine);
  const skip = !nccl.available
    ? `NCCL unavailable: ${nccl.reason}`
    : !Number.isInteger(ranks) || ranks < 2
      ? `--ranks must be at least 2`
      : gpus < ranks
        ? `needs ${ranks} GPUs, found ${gpus}${caps.cuda.available ? '' : ` (CUDA unavailable: ${caps.cuda.reason})`}`
        : undefined;
  if (skip) {
    console.log(`bench:collectives skipped: ${skip}`);
    if (values.json) writeFileSync(values.json, JSON.stringify({ skipped: skip, host: caps, nccl }, null, 2));
    return;
  }

  const sizes = values.sizes ? values.sizes.split(',').map(parseSize) : undefined;
  const plan = makePlan(quick, ranks, dtype, ops, sizes);
  const limitMs = (quick ? 10 : 40) * 60_000;
  const rounds = values.rounds ? Number(values.rounds) : quick ? 1 : 2;
  if (!Number.isInteger(rounds) || rounds < 1) throw new Error('--rounds must be a positive integer');
  const runOurs = async () => {
    const id = Buffer.from(await createUniqueId()).toString('base64');
    return runRanks(
      'Tandem',
      (rank) => [
        process.execPath,
        [
          '--import',
          'tsx',
          join(packageRoot, 'bench/collectives.ts'),
          '--worker',
          '--rank',
          String(rank),
          '--id',
          id,
          '--plan',
          JSON.stringify(plan),
        ],
      ],
      ranks,
      limitMs,
    );
  };

  const torchNccl = values['torch-nccl'];
  if (torchNccl !== 'bundled' && torchNccl !== 'ours') throw new Error('--torch-nccl must be bundled or ours');
  // LD_PRELOAD wins over the wheel's RPATH: PyTorch then calls the very library Tandem loaded.
  const torchEnv = rankEnv(torchNccl === 'ours' && nccl.libraryPath ? { LD_PRELOAD: nccl.libraryPath } : {});
  const torch = probeTorch(torchEnv);
  const torchUsable = torch.available && (torch.devices ?? 0) >= ranks;
  let torchError: string | undefined;
  if (!torchUsable) {
    const reason = torch.available ? `torch sees ${torch.devices} GPUs, needs ${ranks}` : torch.reason;
    console.log(`PyTorch absent: ${reason}; Tandem's figures only`);
    torchError = reason;
  }
  const runTheirs = async () =>
    runRanks(
      'PyTorch',
      (rank) => [
        'python3',
        [
          join(packageRoot, 'bench/collectives_torch.py'),
          '--rank',
          String(rank),
          '--world',
          String(ranks),
          '--port',
          String(port),
          '--plan',
          JSON.stringify(plan),
        ],
      ],
      ranks,
      limitMs,
      torchEnv,
    );
  let port = 0;
  // Each side's best figures over its rounds.
  const keepBest = (acc: Measurement[] | undefined, run: Measurement[]) =>
    !acc
      ? run
      : acc.map((a) => {
          const b = run.find((x) => x.op === a.op && x.bytes === a.bytes);
          if (!b) return a;
          const best = b.busbwGBps > a.busbwGBps ? b : a;
          const lat = [a.latencyUs, b.latencyUs].filter((x): x is number => x !== undefined);
          return { ...best, ...(lat.length ? { latencyUs: Math.min(...lat) } : {}) };
        });
  let ours: Measurement[] | undefined;
  let theirs: Measurement[] | undefined;
  for (let round = 1; round <= rounds; round++) {
    console.log(
      `round ${round}/${rounds}: Tandem, ${ranks} processes, ${dtype}, ${plan.entries.length} measurements ...`,
    );
    ours = keepBest(ours, await runOurs());
    if (!torchUsable || torchError) continue;
    console.log(
      `round ${round}/${rounds}: PyTorch ${torch.version} (NCCL ${torch.ncclVersion ?? '?'}, ${torchNccl}) ...`,
    );
    port = await freePort();
    try {
      theirs = keepBest(theirs, await runTheirs());
    } catch (error) {
      torchError = (error as Error).message;
      theirs = undefined;
      console.log(`PyTorch comparison failed: ${torchError.split('\n')[0]}`);
    }
  }

  const rows = ours!.map((o) => {
    const t = theirs?.find((x) => x.op === o.op && x.bytes === o.bytes);
    const ratio = t ? o.busbwGBps / t.busbwGBps : undefined;
    const extraUs = t && o.latencyUs !== undefined && t.latencyUs !== undefined ? o.latencyUs - t.latencyUs : undefined;
    const bandwidthOk = ratio === undefined || o.bytes < MiB ? undefined : ratio >= 0.95;
    const latencyOk = extraUs === undefined || o.bytes >= MiB ? undefined : extraUs <= 10;
    return { ...o, torch: t, ratio, extraLatencyUs: extraUs, bandwidthOk, latencyOk };
  });
  console.table(
    rows.map((r) => ({
      op: r.op,
      size: human(r.bytes),
      'busbw GB/s': r.busbwGBps.toFixed(1),
      'torch busbw': r.torch ? r.torch.busbwGBps.toFixed(1) : '',
      'vs torch': r.ratio === undefined ? '' : `${(r.ratio * 100).toFixed(1)}%`,
      'lat us': r.latencyUs === undefined ? '' : r.latencyUs.toFixed(1),
      'torch lat us': r.torch?.latencyUs === undefined ? '' : r.torch.latencyUs.toFixed(1),
      'extra us': r.extraLatencyUs === undefined ? '' : r.extraLatencyUs.toFixed(1),
      target: r.bandwidthOk === false || r.latencyOk === false ? 'MISSED' : r.bandwidthOk || r.latencyOk ? 'ok' : '',
    })),
  );
  const missed = rows.filter((r) => r.bandwidthOk === false || r.latencyOk === false);
  if (theirs) {
    console.log(
      missed.length === 0
        ? 'targets met: busbw within 5% of PyTorch from 1 MiB up; at most 10 us extra latency below 1 MiB'
        : `targets missed at ${missed.length} of ${rows.length} rows (marked MISSED)`,
    );
  }
  if (values.json) {
    writeFileSync(
      values.json,
      JSON.stringify(
        {
          host: caps,
          nccl,
          torch: theirs ? torch : { ...torch, available: false, reason: torchError },
          quick,
          rounds,
          ranks,
          dtype,
          plan,
          rows,
        },
        null,
        2,
      ),
    );
    console.log(`wrote ${values.json}`);
  }
}

await main();

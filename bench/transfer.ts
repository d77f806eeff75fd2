/**
 * npm run bench:transfer [-- --quick] [-- --json FILE]
 *
 * Transfer bandwidth against the baselines that bound it, measured in the same run on the same buffers.
 * This version measures the baselines the transfer backends will be judged against: memcpy within one
 * process (the bound for shm) and, where a GPU is present, host<->device copies through the addon.
 * Backend rows (shm, tcp, ucx, cuda-ipc, nccl) are added by the transfer runtime.
 */
import { writeFileSync } from 'node:fs';
import { parseArgs } from 'node:util';
import { capabilities, CudaDevice } from '../lib/index.js';

interface Row {
  path: string;
  bytes: number;
  iterations: number;
  gbps: number;
  p50us: number;
  p99us: number;
  baseline?: string;
  ratio?: number;
}

const { values } = parseArgs({
  options: { quick: { type: 'boolean', default: false }, json: { type: 'string' } },
});
const quick = values.quick ?? false;

function percentile(sorted: number[], p: number): number {
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))]!;
}

async function measure(path: string, bytes: number, op: () => Promise<void> | void): Promise<Row> {
  const budgetMs = quick ? 150 : 600;
  for (let i = 0; i < 3; i++) await op(); // warm-up
  const times: number[] = [];
  const start = performance.now();
  while (performance.now() - start < budgetMs || times.length < 5) {
    const t0 = process.hrtime.bigint();
    await op();
    times.push(Number(process.hrtime.bigint() - t0) / 1e3);
    if (times.length >= 10_000) break;
  }
  times.sort((a, b) => a - b);
  const p50 = percentile(times, 50);
  return { path, bytes, iterations: times.length, gbps: bytes / (p50 * 1e3), p50us: p50, p99us: percentile(times, 99) };
}

const sizes = quick ? [64 << 10, 1 << 20, 16 << 20] : [4 << 10, 64 << 10, 1 << 20, 16 << 20, 64 << 20];
const rows: Row[] = [];
const caps = await capabilities();

for (const bytes of sizes) {
  const src = new Uint8Array(bytes).fill(1);
  const dst = new Uint8Array(bytes);
  rows.push(await measure('memcpy (one process)', bytes, () => dst.set(src)));
}

if (caps.cuda.available) {
  const device = await CudaDevice.open(0);
  for (const bytes of sizes) {
    const buffer = await device.alloc(bytes);
    const host = new Uint8Array(bytes).fill(3);
    const h2d = await measure('host -> device (pageable)', bytes, () => buffer.copyFromHost(host));
    const d2h = await measure('device -> host (pageable)', bytes, () => buffer.copyToHost(host));
    rows.push(h2d, d2h);
    await buffer.dispose();
  }
  await device.dispose();
}

// Each row's ratio to the memcpy of the same size measured above.
for (const row of rows) {
  const base = rows.find((r) => r.path.startsWith('memcpy') && r.bytes === row.bytes);
  if (base && base !== row) {
    row.baseline = base.path;
    row.ratio = row.gbps / base.gbps;
  }
}

const human = (b: number) => (b >= 1 << 20 ? `${b / (1 << 20)} MiB` : `${b / 1024} KiB`);
console.log(
  `host: ${caps.cpu.cores} cores; CUDA ${caps.cuda.available ? caps.cuda.devices.map((d) => d.name).join(', ') : 'unavailable'}`,
);
console.table(
  rows.map((r) => ({
    path: r.path,
    size: human(r.bytes),
    'GB/s': r.gbps.toFixed(2),
    'p50 us': r.p50us.toFixed(1),
    'p99 us': r.p99us.toFixed(1),
    'vs memcpy': r.ratio === undefined ? '' : `${(r.ratio * 100).toFixed(0)}%`,
  })),
);
if (values.json) {
  writeFileSync(values.json, JSON.stringify({ host: caps, quick, rows }, null, 2));
  console.log(`wrote ${values.json}`);
}

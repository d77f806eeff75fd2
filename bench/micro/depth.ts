// Transfers in flight against bandwidth, cuda-ipc WRITE GPU0 -> GPU1 beside NCCL send/recv on the same
// GPUs: runs of `depth` posts issued back to back, then awaited, for each depth; the time per transfer,
// and how much of it the JS thread spent issuing the posts. What fixed cost a run pays (the first copy's
// launch, the JS thread waking for the last completion) against what each transfer pays.
// With --distinct, each transfer in flight has its own source and destination (as transfers for different
// requests would), instead of the same plan posted again.
//   ./run node --import tsx bench/micro/depth.ts [--bytes 1048576] [--depths 1,2,4,8,16,32,64] [--runs 200] [--distinct] [--json FILE]
import { writeFileSync } from 'node:fs';
import { parseArgs } from 'node:util';
import { Communicator, CudaDevice } from '../../lib/index.js';
import { gpuTransferPair } from '../../test/helpers/gpu-pair.js';

const { values } = parseArgs({
  options: {
    bytes: { type: 'string', default: String(1 << 20) },
    depths: { type: 'string', default: '1,2,4,8,16,32,64' },
    runs: { type: 'string', default: '200' },
    distinct: { type: 'boolean', default: false },
    json: { type: 'string' },
  },
});
const bytes = Number(values.bytes);
const depths = values.depths.split(',').map(Number);
const runs = Number(values.runs);
const maxDepth = Math.max(...depths);

const pair = await gpuTransferPair({
  name: 'depth',
  localGpu: 0,
  remoteGpu: 1,
  bytes: bytes * (values.distinct ? maxDepth : 2),
  seedLocal: 1,
  seedRemote: 2,
});
const dev1 = await CudaDevice.open(1);
const recvBuf = await dev1.alloc(bytes);
const [c0, c1] = (await Communicator.initAll({ devices: [0, 1], name: 'depth', timeoutMs: 60_000 })) as [
  Communicator,
  Communicator,
];
const plans = Array.from({ length: values.distinct ? maxDepth : 1 }, (_, i) =>
  pair.agent.prepare({
    op: 'WRITE',
    peer: pair.peer.name,
    local: pair.local,
    remote: pair.remote,
    // distinct: source i onto destination (i * 7) mod n, so that no two in flight touch the same bytes
    pieces: {
      localOffsets: Float64Array.of(i * bytes),
      remoteOffsets: Float64Array.of(((i * 7) % maxDepth) * bytes),
      lengths: bytes,
    },
  }),
);
const plan = plans[0]!;
await pair.agent.warmup(pair.peer.name);
for (const p of plans) for (let i = 0; i < 8; i++) await p.post(); // through the strategy trials

const p50 = (v: number[]) => v.sort((a, b) => a - b)[Math.floor(v.length / 2)]!;
const now = () => Number(process.hrtime.bigint()) / 1e3;

async function tandemRun(depth: number): Promise<{ us: number; postUs: number }> {
  const t0 = now();
  const all: Promise<void>[] = [];
  for (let i = 0; i < depth; i++) all.push(plans[i % plans.length]!.post());
  const posted = now();
  await Promise.all(all);
  return { us: now() - t0, postUs: posted - t0 };
}

async function ncclRun(depth: number): Promise<{ us: number; postUs: number }> {
  const t0 = now();
  const all: Promise<void>[] = [];
  for (let i = 0; i < depth; i++) {
    all.push(
      c0.send({ buffer: pair.buffer, peer: 1, dtype: 'uint8', count: bytes }),
      c1.recv({ buffer: recvBuf, peer: 0, dtype: 'uint8', count: bytes }),
    );
  }
  const posted = now();
  await Promise.all(all);
  return { us: now() - t0, postUs: posted - t0 };
}

interface Point {
  depth: number;
  what: string;
  usPerTransfer: number;
  gbps: number;
  postUsPerTransfer: number;
}
const points: Point[] = [];
for (const depth of depths) {
  for (const [what, run] of [
    ['cuda-ipc', tandemRun],
    ['nccl', ncclRun],
  ] as const) {
    const n = Math.max(20, Math.round((runs * 8) / Math.max(depth, 8)));
    for (let i = 0; i < 5; i++) await run(depth);
    const us: number[] = [];
    const post: number[] = [];
    for (let i = 0; i < n; i++) {
      const r = await run(depth);
      us.push(r.us);
      post.push(r.postUs);
    }
    const perTransfer = p50(us) / depth;
    points.push({
      depth,
      what,
      usPerTransfer: perTransfer,
      gbps: bytes / (perTransfer * 1e3),
      postUsPerTransfer: p50(post) / depth,
    });
  }
}
const rows = depths.map((depth) => {
  const t = points.find((p) => p.depth === depth && p.what === 'cuda-ipc')!;
  const n = points.find((p) => p.depth === depth && p.what === 'nccl')!;
  return {
    depth,
    'cuda-ipc us/transfer': t.usPerTransfer.toFixed(2),
    'cuda-ipc GB/s': t.gbps.toFixed(1),
    'post us': t.postUsPerTransfer.toFixed(2),
    'nccl us/op': n.usPerTransfer.toFixed(2),
    'nccl GB/s': n.gbps.toFixed(1),
    'nccl post us': n.postUsPerTransfer.toFixed(2),
    ratio: (t.gbps / n.gbps).toFixed(2),
  };
});
console.log(
  `${bytes} bytes per transfer (${values.distinct ? 'each its own bytes' : 'one plan posted again'}), copy strategy ${plan.copyStrategy}, up to ${maxDepth} in flight`,
);
console.table(rows);
if (values.json)
  writeFileSync(
    values.json,
    JSON.stringify(
      {
        bytes,
        distinct: values.distinct,
        copyStrategy: plan.copyStrategy,
        points,
      },
      null,
      2,
    ),
  );
await c0.dispose();
await c1.dispose();
await recvBuf.dispose();
await dev1.dispose();
await pair.dispose();

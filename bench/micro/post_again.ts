// Post-again probe: JS-thread time of plan.post() right after the previous post resolved, against a 200-step
// JS loop and a trivial native getter timed just before it and a second post right after it: is the thread
// itself slow after waiting for the transfer, or is it the post?
//   node --import tsx bench/micro/post_again.ts [shm|tcp|ucx] [pieces=256] [pieceBytes=65536] [iterations=100]
import { TransferAgent } from '../../lib/index.js';
import { PeerProcess } from '../../test/helpers/peer.js';
const backend = (process.argv[2] ?? 'ucx') as 'ucx';
const pieces = Number(process.argv[3] ?? 256);
const piece = Number(process.argv[4] ?? 65536);
const iters = Number(process.argv[5] ?? 100);
const target = await PeerProcess.start();
await target.request('create', { name: 't' });
const cap = 2 * pieces * piece;
const { region } = await target.request<{ region: { id: number } }>('allocShared', { bytes: cap });
const agent = await TransferAgent.create({ name: 'i' });
const local = agent.allocShared(cap);
agent.loadRemote(Buffer.from((await target.request<{ metadata: string }>('metadata')).metadata, 'base64'));
await target.request('load', { metadata: Buffer.from(agent.metadata()).toString('base64') });
const offs = Float64Array.from({ length: pieces }, (_, i) => i * 2 * piece);
const plan = agent.prepare({
  op: 'WRITE',
  peer: 't',
  local,
  remote: region.id,
  pieces: { localOffsets: offs, remoteOffsets: offs, lengths: piece },
  backend,
});
const us: number[] = [];
const gs: number[] = [];
const xs: number[] = [];
const js: number[] = [];
const g2s: number[] = [];
let sink = 0;
for (let i = 0; i < iters; i++) {
  const j = process.hrtime.bigint();
  for (let k = 0; k < 200; k++) sink += Math.sqrt(k + i);
  const g = process.hrtime.bigint();
  sink += agent.directPosts;
  const g2 = process.hrtime.bigint();
  sink += agent.directPosts;
  js.push(Number(g - j) / 1e3);
  g2s.push(Number(process.hrtime.bigint() - g2) / 1e3);
  const a = process.hrtime.bigint();
  const p = plan.post();
  const b = process.hrtime.bigint();
  const p2 = plan.post();
  const c = process.hrtime.bigint();
  gs.push(Number(a - g) / 1e3);
  us.push(Number(b - a) / 1e3);
  xs.push(Number(c - b) / 1e3);
  await p;
  await p2;
}
const q = (v: number[], p: number) => v.sort((x, y) => x - y)[Math.floor(p * v.length)]!.toFixed(1);
console.log(
  `${backend} ${pieces}x${piece} spin=${process.env.TANDEM_PROGRESS_SPIN_US ?? 'default'}: js ${q(js, 0.5)} getter p50 ${q(gs, 0.5)} getter2 ${q(g2s, 0.5)} | post p10 ${q(us, 0.1)} p50 ${q(us, 0.5)} p90 ${q(us, 0.9)} | second post p50 ${q(xs, 0.5)} (${sink >= 0})`,
);
await agent.dispose();
await target.stop();

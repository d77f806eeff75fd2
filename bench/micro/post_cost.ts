// The cost of one post() on the JS thread, layer by layer, against TypedArray.set of the same bytes: an shm
// WRITE of one piece to a target process, copied on the calling thread (nothing else in flight). Loops of N
// calls: set; the native plan's post; TransferPlan.post; awaited; and `await undefined` for scale.
//   node --import tsx bench/micro/post_cost.ts [bytes=64] [N=2000000]
import { TransferAgent } from '../../lib/index.js';
import { PeerProcess } from '../../test/helpers/peer.js';
const target = await PeerProcess.start();
await target.request('create', { name: 't' });
const cap = 1 << 20;
const { region } = await target.request<{ region: { id: number } }>('allocShared', { bytes: cap });
const agent = await TransferAgent.create({ name: 'i' });
const local = agent.allocShared(cap);
const scratch = agent.allocShared(cap);
agent.loadRemote(Buffer.from((await target.request<{ metadata: string }>('metadata')).metadata, 'base64'));
await target.request('load', { metadata: Buffer.from(agent.metadata()).toString('base64') });
const len = Number(process.argv[2] ?? 64);
const tiny = agent.prepare({
  op: 'WRITE',
  peer: 't',
  local,
  remote: region.id,
  pieces: { localOffsets: Float64Array.of(0), remoteOffsets: Float64Array.of(0), lengths: len },
});
await tiny.post();
const rawTiny = (tiny as unknown as { raw: { post(): unknown } }).raw;
const src = local.view!.subarray(0, len),
  dst = scratch.view!.subarray(0, len);
const N = Number(process.argv[3] ?? 2_000_000);
for (let r = 0; r < 3; r++) {
  let t = process.hrtime.bigint();
  for (let i = 0; i < N; i++) dst.set(src);
  const a = Number(process.hrtime.bigint() - t) / N;
  t = process.hrtime.bigint();
  for (let i = 0; i < N; i++) rawTiny.post();
  const b = Number(process.hrtime.bigint() - t) / N;
  t = process.hrtime.bigint();
  for (let i = 0; i < N; i++) tiny.post();
  const c = Number(process.hrtime.bigint() - t) / N;
  t = process.hrtime.bigint();
  for (let i = 0; i < N; i++) await tiny.post();
  const d = Number(process.hrtime.bigint() - t) / N;
  t = process.hrtime.bigint();
  for (let i = 0; i < N; i++) await undefined;
  const e = Number(process.hrtime.bigint() - t) / N;
  console.log(
    `ns: set ${a.toFixed(0)} raw.post ${b.toFixed(0)} plan.post ${c.toFixed(0)} await plan.post ${d.toFixed(0)} await undefined ${e.toFixed(0)}`,
  );
}
await agent.dispose();
await target.stop();

// Where the time of a 64 KiB cuda-ipc WRITE + notification to a polling target goes, GPU0 -> GPU1: the
// post() call on this thread, then post() returning to the target taking the notification. Two
// initiators in this process against one polling target process: one whose notifications the GPU stream
// commits right after the copy (the default), and the baseline, made with TANDEM_STREAM_COMMIT=0, whose
// agent thread commits them once it sees the copy done. Rounds alternate between the two.
//   ./run node --import tsx bench/micro/notify_stages.ts [--rounds 3] [--posts 2000] [--gap-us 0] [--json FILE]
import { writeFileSync } from 'node:fs';
import { parseArgs } from 'node:util';
import { gpuTransferPair, type GpuTransferPair } from '../../test/helpers/gpu-pair.js';

const { values } = parseArgs({
  options: {
    rounds: { type: 'string', default: '3' },
    posts: { type: 'string', default: '2000' },
    'gap-us': { type: 'string', default: '0' },
    json: { type: 'string' },
  },
});
const rounds = Number(values.rounds);
const posts = Number(values.posts);
const gapNs = BigInt(Math.round(Number(values['gap-us']) * 1000));

async function pair(name: string, streamCommit: boolean): Promise<GpuTransferPair> {
  const before = process.env.TANDEM_STREAM_COMMIT;
  if (!streamCommit) process.env.TANDEM_STREAM_COMMIT = '0'; // read when the agent is made
  try {
    return await gpuTransferPair({
      name,
      localGpu: 0,
      remoteGpu: 1,
      bytes: 1 << 20,
      seedLocal: 1,
      seedRemote: 2,
      notifications: 'poll',
    });
  } finally {
    if (before === undefined) delete process.env.TANDEM_STREAM_COMMIT;
    else process.env.TANDEM_STREAM_COMMIT = before;
  }
}

const pct = (v: number[], q: number) => v[Math.min(v.length - 1, Math.floor((q / 100) * v.length))]!;
const summary = (v: number[]) => {
  v.sort((a, b) => a - b);
  return { p10: pct(v, 10), p50: pct(v, 50), p90: pct(v, 90) };
};

async function round(p: GpuTransferPair, plan: ReturnType<GpuTransferPair['agent']['prepare']>) {
  const { agent, target } = p;
  const spin = target.request<{ notifications: { text: string; t: string }[] }>('spin', {
    count: posts,
    timeoutMs: 60_000,
  });
  await target.nextEvent((e) => e.event === 'spinning');
  const started = new Map<string, bigint>();
  const returned = new Map<string, bigint>();
  const call: number[] = [];
  const committed = agent.streamCommits;
  for (let i = 0; i < posts; i++) {
    const note = `p${i}`;
    const a = process.hrtime.bigint();
    const posted = plan.post({ notify: note });
    const b = process.hrtime.bigint();
    started.set(note, a);
    returned.set(note, b);
    call.push(Number(b - a) / 1e3);
    await posted;
    for (const s = process.hrtime.bigint(); process.hrtime.bigint() - s < gapNs;);
  }
  const { notifications } = await spin;
  if (notifications.length !== posts)
    throw new Error(`the target took ${notifications.length} of ${posts} notifications`);
  const since = (from: Map<string, bigint>) => notifications.map((n) => Number(BigInt(n.t) - from.get(n.text)!) / 1e3);
  return {
    postCall: summary(call),
    returnToTaken: summary(since(returned)),
    postToTaken: summary(since(started)),
    streamCommits: agent.streamCommits - committed,
  };
}

const setups = [
  { mode: 'stream commits', p: await pair('stages-stream', true) },
  { mode: 'agent thread commits (TANDEM_STREAM_COMMIT=0)', p: await pair('stages-host', false) },
];
const plans = setups.map(({ p }) =>
  p.agent.prepare({
    op: 'WRITE',
    peer: p.peer.name,
    local: p.local,
    remote: p.remote,
    pieces: { localOffsets: Float64Array.of(0), remoteOffsets: Float64Array.of(0), lengths: 64 << 10 },
  }),
);
for (const plan of plans) for (let i = 0; i < 10; i++) await plan.post(); // mappings, strategy trials
const rows: Record<string, string | number>[] = [];
const results: unknown[] = [];
const f = (s: { p10: number; p50: number; p90: number }) =>
  `${s.p10.toFixed(1)} / ${s.p50.toFixed(1)} / ${s.p90.toFixed(1)}`;
for (let r = 0; r < rounds; r++) {
  for (const [i, { mode, p }] of setups.entries()) {
    const out = await round(p, plans[i]!);
    results.push({ round: r, mode, ...out });
    rows.push({
      round: r,
      mode,
      'post() call p10/p50/p90 us': f(out.postCall),
      'return -> taken': f(out.returnToTaken),
      'post -> taken': f(out.postToTaken),
      'stream commits': out.streamCommits,
    });
  }
}
console.log(
  `64 KiB cuda-ipc WRITE + notification, GPU0 -> GPU1, polling target; ${posts} posts per round, each awaited`,
);
console.table(rows);
if (values.json)
  writeFileSync(values.json, JSON.stringify({ posts, gapUs: Number(values['gap-us']), results }, null, 2));
for (const { p } of setups) await p.dispose();

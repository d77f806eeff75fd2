import { spawnSync } from 'node:child_process';
import { afterEach, describe, expect, it } from 'vitest';
import { CanceledError, DisposedError, RemoteDisconnectError, TimeoutError, TransferAgent } from '../lib/index.js';
import { packageRoot } from '../lib/native/paths.js';
import { PeerProcess } from './helpers/peer.js';

// Failure handling between two real processes. The target is stopped (SIGSTOP) to hold work in
// flight, then killed or resumed; every case is bounded in time and cleans up after itself.
const BIG = 256 << 20; // larger than the socket buffers, so a tcp WRITE is still in flight when stopped

describe('transfer failures', () => {
  const cleanup: (() => Promise<void>)[] = [];
  afterEach(async () => {
    for (const f of cleanup.splice(0).reverse()) await f();
  });

  async function setup(timeoutMs?: number) {
    const target = await PeerProcess.start();
    cleanup.push(async () => {
      target.child.kill('SIGCONT');
      await target.stop();
    });
    await target.request('create', { name: 'fail-target' });
    const region = (await target.request<{ region: { id: number } }>('allocShared', { bytes: BIG })).region.id;
    const agent = await TransferAgent.create({ name: 'fail-initiator', ...(timeoutMs ? { timeoutMs } : {}) });
    cleanup.push(() => agent.dispose());
    const local = agent.allocShared(BIG);
    const { metadata } = await target.request<{ metadata: string }>('metadata');
    const peer = agent.loadRemote(Buffer.from(metadata, 'base64'));
    const plan = (op: 'READ' | 'WRITE', backend: 'shm' | 'tcp' | 'ucx', bytes = BIG) =>
      agent.prepare({
        op,
        peer: peer.name,
        local,
        remote: region,
        pieces: { localOffsets: Float64Array.of(0), remoteOffsets: Float64Array.of(0), lengths: bytes },
        backend,
      });
    // Warm the connection up so that the peer is known to be alive.
    await plan('WRITE', 'tcp', 4096).post();
    return { target, agent, plan };
  }

  it.for(['tcp', 'ucx'] as const)(
    'a peer killed mid-WRITE over %s rejects the pending transfer with RemoteDisconnectError within a deadline',
    async (backend, ctx) => {
      const { target, agent, plan } = await setup();
      // Without UCX here (built without its headers, or libucp does not load) the ucx case skips, saying why.
      if (!agent.backends.includes(backend)) return ctx.skip(`${backend} unavailable: ${agent.ucxUnavailableReason}`);
      await target.freeze();
      const pending = plan('WRITE', backend as 'tcp').post();
      await new Promise((r) => setTimeout(r, 200)); // let the send fill the socket buffers
      const t0 = Date.now();
      target.child.kill('SIGKILL');
      await expect(pending).rejects.toBeInstanceOf(RemoteDisconnectError);
      expect(Date.now() - t0).toBeLessThan(5_000);
    },
  );

  it('a peer killed while a READ waits for its answer rejects it, and later transfers are refused', async () => {
    const { target, plan } = await setup();
    await target.freeze();
    const pending = plan('READ', 'tcp', 1 << 20).post();
    await new Promise((r) => setTimeout(r, 100));
    target.child.kill('SIGKILL');
    await expect(pending).rejects.toThrow(/fail-target/);
    await expect(pending).rejects.toBeInstanceOf(RemoteDisconnectError);
    // New plans for the dead peer are refused at prepare time.
    expect(() => plan('WRITE', 'shm', 4096)).toThrow(RemoteDisconnectError);
    expect(() => plan('WRITE', 'tcp', 4096)).toThrow(RemoteDisconnectError);
  });

  it('an unresponsive peer times out with TimeoutError; the agent stays usable', async () => {
    const { target, plan } = await setup(500);
    await target.freeze();
    const t0 = Date.now();
    await expect(plan('READ', 'tcp', 1 << 20).post()).rejects.toBeInstanceOf(TimeoutError);
    expect(Date.now() - t0).toBeLessThan(5_000);
    target.child.kill('SIGCONT');
    await plan('WRITE', 'shm', 4096).post();
  });

  it('aborting a pending transfer rejects it with CanceledError at once', async () => {
    const { target, plan } = await setup();
    await target.freeze();
    const controller = new AbortController();
    const pending = plan('READ', 'tcp', 1 << 20).post({ signal: controller.signal });
    await new Promise((r) => setTimeout(r, 50));
    controller.abort();
    await expect(pending).rejects.toBeInstanceOf(CanceledError);
    target.child.kill('SIGCONT');
  });

  it('dispose rejects whatever is still pending and ends the process cleanly', async () => {
    const { target, agent, plan } = await setup();
    await target.freeze();
    const pending = plan('READ', 'tcp', 1 << 20).post();
    await new Promise((r) => setTimeout(r, 50));
    await agent.dispose();
    await expect(pending).rejects.toThrow(/disposed/);
    target.child.kill('SIGCONT');
  });
});

describe('a plan outliving its agent', () => {
  it('posts of a plan whose agent was disposed reject with DisposedError through the promise; other agents go on', async () => {
    const b = await TransferAgent.create({ name: 'outlive-b' });
    const a = await TransferAgent.create({ name: 'outlive-a' });
    try {
      const region = b.allocShared(1 << 20);
      const local = a.allocShared(1 << 20);
      a.loadRemote(b.metadata());
      b.loadRemote(a.metadata());
      const plan = (from: TransferAgent, to: string, l: typeof local, r: number) =>
        from.prepare({
          op: 'WRITE',
          peer: to,
          local: l,
          remote: r,
          pieces: { localOffsets: Float64Array.of(0), remoteOffsets: Float64Array.of(0), lengths: 4096 },
        });
      const doomed = plan(a, 'outlive-b', local, region.id);
      local.view!.fill(7);
      await doomed.post();
      expect(region.view![4095]).toBe(7);
      await a.dispose();
      let pending: Promise<void> | undefined;
      expect(() => (pending = doomed.post({ notify: 'never' }))).not.toThrow();
      await expect(pending).rejects.toBeInstanceOf(DisposedError);
      await expect(doomed.post()).rejects.toThrow(/disposed/);
      // The other agent, in the same process, still moves data (to a fresh peer of its own).
      const c = await TransferAgent.create({ name: 'outlive-c' });
      try {
        const into = c.allocShared(1 << 20);
        b.loadRemote(c.metadata());
        const mine = b.allocShared(1 << 20);
        mine.view!.fill(9);
        await plan(b, 'outlive-c', mine, into.id).post();
        expect(into.view![0]).toBe(9);
      } finally {
        await c.dispose();
      }
    } finally {
      await a.dispose();
      await b.dispose();
    }
  });
});

describe('registration churn', () => {
  it('10,000 register/deregister cycles neither slow down nor grow memory or descriptors', () => {
    // In a fresh process with --expose-gc, so that memory is measured after collection.
    const script = `
      import { TransferAgent } from './lib/index.ts';
      import { readdirSync } from 'node:fs';
      const agent = await TransferAgent.create({ name: 'churn' });
      const fds = () => readdirSync('/proc/self/fd').length;
      const batch = (n) => {
        const t0 = performance.now();
        for (let i = 0; i < n; i++) {
          agent.deregister(agent.allocShared(64 << 10));
          agent.deregister(agent.registerHost(Buffer.alloc(4096)));
        }
        return performance.now() - t0;
      };
      batch(500);
      global.gc(); await new Promise((r) => setTimeout(r, 50)); global.gc();
      const rss0 = process.memoryUsage().rss, fd0 = fds();
      const first = batch(1000);
      for (let k = 0; k < 8; k++) { batch(1000); global.gc(); await new Promise((r) => setImmediate(r)); }
      const last = batch(1000);
      global.gc(); await new Promise((r) => setTimeout(r, 50)); global.gc();
      const rss1 = process.memoryUsage().rss, fd1 = fds();
      console.log(JSON.stringify({ first, last, rssGrowth: rss1 - rss0, fdGrowth: fd1 - fd0, regions: agent.registered().length }));
      await agent.dispose();
    `;
    const r = spawnSync(process.execPath, ['--expose-gc', '--import', 'tsx', '--input-type=module', '-e', script], {
      cwd: packageRoot,
      encoding: 'utf8',
      timeout: 120_000,
    });
    expect(r.status, r.stderr).toBe(0);
    const m = JSON.parse(r.stdout.trim().split('\n').pop()!) as {
      first: number;
      last: number;
      rssGrowth: number;
      fdGrowth: number;
      regions: number;
    };
    expect(m.regions).toBe(0);
    expect(m.fdGrowth).toBeLessThanOrEqual(2);
    expect(m.rssGrowth).toBeLessThan(64 << 20);
    // Relative, not absolute: the last thousand cycles cost about what the first thousand did.
    expect(m.last).toBeLessThan(m.first * 3 + 20);
  });
});

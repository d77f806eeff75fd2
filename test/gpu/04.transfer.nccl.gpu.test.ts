import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  CudaDevice,
  RemoteDisconnectError,
  TransferAgent,
  type DeviceBuffer,
  type Region,
  type RemotePeer,
} from '../../lib/index.js';
import { fillPatternOnGpu, mismatchesOnGpu } from '../helpers/gpu-pattern.js';
import { gpuGate } from '../helpers/gpu.js';
import { gpuTransferPair } from '../helpers/gpu-pair.js';
import { PeerProcess } from '../helpers/peer.js';

// The nccl backend between two real processes on two GPUs (the path for GPU pairs that CUDA IPC cannot
// reach, forced here on one host): grouped send/recv with the target taking part over the agents'
// connection. Bytes are checked on the GPUs with the pattern kernel.
const gate = await gpuGate(2);
if (gate.run && !gate.caps.nccl.available && process.env.TANDEM_REQUIRE_GPU === '1') {
  throw new Error(`TANDEM_REQUIRE_GPU=1 but NCCL is unavailable: ${gate.caps.nccl.reason}`);
}
const run = gate.run && gate.caps.nccl.available;
const BLOCK = 64 << 10;
const BLOCKS = 512; // 32 MiB per side

describe.skipIf(!run).each([
  [0, 1],
  [1, 0],
])('nccl: initiator on GPU %i, target on GPU %i', (localGpu, remoteGpu) => {
  let target: PeerProcess;
  let agent: TransferAgent;
  let device: CudaDevice;
  let buffer: DeviceBuffer;
  let local: Region;
  let peer: RemotePeer;
  let remote: number;
  const SEED_LOCAL = 21;
  const SEED_REMOTE = 87;

  beforeAll(async () => {
    target = await PeerProcess.start();
    await target.request('create', { name: `nccl-target-${localGpu}-${remoteGpu}`, timeoutMs: 20_000 });
    remote = (
      await target.request<{ region: { id: number } }>('allocDevice', {
        device: remoteGpu,
        bytes: BLOCK * BLOCKS,
        seed: SEED_REMOTE,
      })
    ).region.id;
    agent = await TransferAgent.create({ name: `nccl-initiator-${localGpu}-${remoteGpu}`, timeoutMs: 20_000 });
    expect(agent.backends).toContain('nccl');
    device = await CudaDevice.open(localGpu);
    buffer = await device.alloc(BLOCK * BLOCKS);
    await fillPatternOnGpu(device, buffer, SEED_LOCAL);
    local = agent.registerDevice(buffer);
    const { metadata } = await target.request<{ metadata: string }>('metadata');
    peer = agent.loadRemote(Buffer.from(metadata, 'base64'));
    await target.request('load', { metadata: Buffer.from(agent.metadata()).toString('base64') });
  });

  afterAll(async () => {
    await agent?.dispose();
    await device?.dispose();
    await target?.stop();
  });

  const scattered = (n: number, mul: number, add: number) =>
    Array.from({ length: n }, (_, i) => (i * mul + add) % BLOCKS);
  const prepare = (op: 'READ' | 'WRITE', localBlocks: number[], remoteBlocks: number[], blocks = 1) =>
    agent.prepare({
      op,
      peer: peer.name,
      local,
      remote,
      backend: 'nccl',
      pieces: {
        localOffsets: Float64Array.from(localBlocks, (b) => b * BLOCK),
        remoteOffsets: Float64Array.from(remoteBlocks, (b) => b * BLOCK),
        lengths: blocks * BLOCK,
      },
    });
  const remoteMismatches = async (offset: number, length: number, seed: number, base: number) =>
    (await target.request<{ mismatches: number }>('checkDevice', { region: remote, offset, length, seed, base }))
      .mismatches;

  it('WRITE: 256 scattered 64 KiB blocks land where asked, checked on the target GPU', async () => {
    const src = scattered(256, 37, 5);
    const dst = scattered(256, 101, 3);
    const plan = prepare('WRITE', src, dst);
    expect(plan.backend).toBe('nccl');
    await plan.post();
    for (let i = 0; i < src.length; i++) {
      expect(await remoteMismatches(dst[i]! * BLOCK, BLOCK, SEED_LOCAL, src[i]! * BLOCK), `block ${src[i]}`).toBe(0);
    }
    const untouched = [...Array(BLOCKS).keys()].find((b) => !dst.includes(b))!;
    expect(await remoteMismatches(untouched * BLOCK, BLOCK, SEED_REMOTE, untouched * BLOCK)).toBe(0);
  });

  it('READ: scattered blocks come back into local GPU memory', async () => {
    await target.request('fillDevice', { region: remote, seed: SEED_REMOTE });
    const src = scattered(128, 53, 1); // remote blocks
    const dst = scattered(128, 29, 7); // local blocks
    await prepare('READ', dst, src).post();
    for (let i = 0; i < src.length; i++) {
      expect(
        await mismatchesOnGpu(device, buffer, SEED_REMOTE, dst[i]! * BLOCK, BLOCK, src[i]! * BLOCK),
        `block ${src[i]}`,
      ).toBe(0);
    }
    await fillPatternOnGpu(device, buffer, SEED_LOCAL);
  });

  it('a plan posted again and again, interleaved with another, moves the right bytes each time', async () => {
    await target.request('fillDevice', { region: remote, seed: SEED_REMOTE });
    const a = prepare('WRITE', [0, 1, 2, 3], [200, 150, 100, 50]);
    const b = prepare('WRITE', [10], [300], 16); // one 1 MiB piece
    const posts: Promise<void>[] = [];
    for (let i = 0; i < 8; i++) posts.push(a.post(), b.post());
    await Promise.all(posts);
    for (const [i, dst] of [200, 150, 100, 50].entries()) {
      expect(await remoteMismatches(dst * BLOCK, BLOCK, SEED_LOCAL, i * BLOCK)).toBe(0);
    }
    expect(await remoteMismatches(300 * BLOCK, 16 * BLOCK, SEED_LOCAL, 10 * BLOCK)).toBe(0);
  });

  it('the notification arrives after the data is visible on the target GPU', async () => {
    for (let round = 0; round < 3; round++) {
      const dstBlock = (round * 97 + 13) % (BLOCKS - 8);
      const plan = prepare('WRITE', [0], [dstBlock], 8);
      const note = JSON.stringify({
        round,
        check: { region: remote, offset: dstBlock * BLOCK, length: 8 * BLOCK, seed: SEED_LOCAL, base: 0 },
      });
      await plan.post({ notify: note });
      const event = await target.nextEvent((e) => e.event === 'notification' && e.text === note);
      expect((event as { mismatches?: number }).mismatches, `round ${round}`).toBe(0);
    }
  });

  it('a piece the target no longer has is refused by the target; later transfers still work', async () => {
    const extra = (
      await target.request<{ region: { id: number } }>('allocDevice', { device: remoteGpu, bytes: BLOCK, seed: 1 })
    ).region.id;
    const { metadata } = await target.request<{ metadata: string }>('metadata');
    agent.loadRemote(Buffer.from(metadata, 'base64'));
    const doomed = agent.prepare({
      op: 'WRITE',
      peer: peer.name,
      local,
      remote: extra,
      backend: 'nccl',
      pieces: { localOffsets: Float64Array.of(0), remoteOffsets: Float64Array.of(0), lengths: BLOCK },
    });
    await target.request('deregister', { region: extra });
    await expect(doomed.post()).rejects.toThrow(/not registered|deregistered/);
    const plan = prepare('WRITE', [5], [400]);
    await plan.post();
    expect(await remoteMismatches(400 * BLOCK, BLOCK, SEED_LOCAL, 5 * BLOCK)).toBe(0);
  });
});

describe.skipIf(!run)('nccl: failures', () => {
  it('a target killed while a WRITE waits for its half rejects it with RemoteDisconnectError within a deadline', async () => {
    const target = await PeerProcess.start();
    const agent = await TransferAgent.create({ name: 'nccl-kill-initiator', timeoutMs: 30_000 });
    const device = await CudaDevice.open(0);
    try {
      await target.request('create', { name: 'nccl-kill-target' });
      const remote = (
        await target.request<{ region: { id: number } }>('allocDevice', { device: 1, bytes: BLOCK * 16, seed: 3 })
      ).region.id;
      const buffer = await device.alloc(BLOCK * 16);
      const local = agent.registerDevice(buffer);
      const { metadata } = await target.request<{ metadata: string }>('metadata');
      const peer = agent.loadRemote(Buffer.from(metadata, 'base64'));
      const plan = agent.prepare({
        op: 'WRITE',
        peer: peer.name,
        local,
        remote,
        backend: 'nccl',
        pieces: { localOffsets: Float64Array.of(0), remoteOffsets: Float64Array.of(0), lengths: BLOCK * 16 },
      });
      await plan.post(); // the link works
      await target.freeze();
      const pending = plan.post();
      await new Promise((r) => setTimeout(r, 200));
      const t0 = Date.now();
      target.child.kill('SIGKILL');
      await expect(pending).rejects.toBeInstanceOf(RemoteDisconnectError);
      expect(Date.now() - t0).toBeLessThan(10_000);
    } finally {
      await agent.dispose();
      await device.dispose();
      await target.stop();
    }
  });
});

describe.skipIf(!run)('nccl: a target that polls its notifications', () => {
  it('WRITE notifications are taken in order with plain ones, after their data; a refused one holds none back', async () => {
    const pair = await gpuTransferPair({
      name: 'nccl-poll',
      localGpu: 0,
      remoteGpu: 1,
      bytes: BLOCK * 64,
      seedLocal: 31,
      seedRemote: 32,
      timeoutMs: 20_000,
      notifications: 'poll',
    });
    try {
      const { agent, local, peer, remote, target } = pair;
      const write = (region: number, dst: number, src: number) =>
        agent.prepare({
          op: 'WRITE',
          peer: peer.name,
          local,
          remote: region,
          backend: 'nccl',
          pieces: {
            localOffsets: Float64Array.of(src * BLOCK),
            remoteOffsets: Float64Array.of(dst * BLOCK),
            lengths: 2 * BLOCK,
          },
        });
      const taken: { text: string; mismatches?: number }[] = [];
      const take = async (count: number) => {
        for (let i = 0; i < 400 && taken.length < count; i++) {
          taken.push(...(await target.request<{ notifications: typeof taken }>('take')).notifications);
          if (taken.length < count) await new Promise((r) => setTimeout(r, 5));
        }
        return taken.map((t) => t.text);
      };
      const expected: string[] = [];
      for (let round = 0; round < 3; round++) {
        const dst = 8 * round + 2;
        const note = JSON.stringify({
          round,
          check: { region: remote, offset: dst * BLOCK, length: 2 * BLOCK, seed: 31, base: 4 * round * BLOCK },
        });
        await write(remote, dst, 4 * round).post({ notify: note });
        await agent.notify(peer.name, `plain ${round}`);
        expected.push(note, `plain ${round}`);
      }
      expect(await take(expected.length)).toEqual(expected);
      expect(taken.filter((t) => t.mismatches !== undefined).map((t) => t.mismatches)).toEqual([0, 0, 0]);

      // A WRITE the target refuses carries a numbered notification that never comes: the next ones must not
      // wait for it.
      const extra = (
        await target.request<{ region: { id: number } }>('allocDevice', { device: 1, bytes: 2 * BLOCK, seed: 1 })
      ).region.id;
      agent.loadRemote(Buffer.from((await target.request<{ metadata: string }>('metadata')).metadata, 'base64'));
      const doomed = write(extra, 0, 0);
      await target.request('deregister', { region: extra });
      await expect(doomed.post({ notify: 'never' })).rejects.toThrow(/not registered|deregistered/);
      await agent.notify(peer.name, 'after the refused one');
      expect(await take(expected.length + 1)).toEqual([...expected, 'after the refused one']);
    } finally {
      await pair.dispose();
    }
  });
});

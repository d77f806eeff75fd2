import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import {
  BackendUnavailableError,
  BadDescriptorError,
  CanceledError,
  NotRegisteredError,
  OutOfBoundsError,
  TransferAgent,
  UnknownPeerError,
  type Region,
  type RemotePeer,
} from '../lib/index.js';
import { fillPattern, patternBytes, sha256 } from './helpers/pattern.js';
import { PeerProcess } from './helpers/peer.js';

// Two real processes: this test process (agent "initiator") and a child (agent "target"), moving
// scattered blocks of host memory over each host backend. Bytes are checked on both sides.
const BLOCK = 64 << 10;
const BLOCKS = 64;

describe.each(['shm', 'tcp', 'ucx'] as const)('transfer between two processes over %s', (backend) => {
  let target: PeerProcess;
  let agent: TransferAgent;
  let local: Region;
  let peer: RemotePeer;
  let remoteShared: number;
  let remotePlain: number;

  beforeAll(async () => {
    target = await PeerProcess.start();
    await target.request('create', { name: `target-${backend}` });
    remoteShared = (await target.request<{ region: { id: number } }>('allocShared', { bytes: BLOCK * BLOCKS, seed: 7 }))
      .region.id;
    remotePlain = (await target.request<{ region: { id: number } }>('registerHost', { bytes: BLOCK * BLOCKS, seed: 9 }))
      .region.id;
    agent = await TransferAgent.create({ name: `initiator-${backend}` });
    local = agent.allocShared(BLOCK * BLOCKS);
    fillPattern(local.view!, 1);
    const { metadata } = await target.request<{ metadata: string }>('metadata');
    peer = agent.loadRemote(Buffer.from(metadata, 'base64'));
    await target.request('load', { metadata: Buffer.from(agent.metadata()).toString('base64') });
  });

  afterAll(async () => {
    await agent?.dispose();
    await target?.stop();
  });

  // Without UCX here (the addon was built without its headers, or libucp does not load) the ucx cases
  // skip, saying why; where the agent offers ucx they run.
  beforeEach((ctx) => {
    if (!agent.backends.includes(backend)) ctx.skip(`${backend} unavailable: ${agent.ucxUnavailableReason}`);
  });

  it('the agent offers the backend here (CI installs UCX)', () => {
    expect(agent.backends, agent.ucxUnavailableReason).toContain(backend);
  });

  it('the peer is on this host, with its regions described', () => {
    expect(peer.name).toBe(`target-${backend}`);
    expect(peer.sameHost).toBe(true);
    expect(peer.regions.map((r) => r.kind).sort()).toEqual(['host', 'shared']);
    expect(peer.backends).toEqual(expect.arrayContaining(['shm', 'tcp', backend]));
  });

  it('WRITE moves scattered blocks, each to its own destination, and nothing else', async () => {
    const src = [3, 17, 4, 40, 63, 0, 22];
    const dst = [9, 2, 10, 11, 0, 63, 30];
    const plan = agent.prepare({
      op: 'WRITE',
      peer: peer.name,
      local,
      remote: remoteShared,
      pieces: {
        localOffsets: Float64Array.from(src, (b) => b * BLOCK),
        remoteOffsets: Float64Array.from(dst, (b) => b * BLOCK),
        lengths: BLOCK,
      },
      ...(backend !== 'shm' ? { backend } : {}),
    });
    expect(plan.backend).toBe(backend);
    expect(plan.bytes).toBe(src.length * BLOCK);
    await plan.post();
    for (let b = 0; b < BLOCKS; b++) {
      const i = dst.indexOf(b);
      const expected = i >= 0 ? patternBytes(BLOCK, 1, src[i]! * BLOCK) : patternBytes(BLOCK, 7, b * BLOCK);
      const { sha256: got } = await target.request<{ sha256: string }>('sha256', {
        region: remoteShared,
        offset: b * BLOCK,
        length: BLOCK,
      });
      expect(got, `block ${b}`).toBe(sha256(expected));
    }
  });

  it('READ brings scattered blocks from the peer into local memory', async () => {
    fillPattern(local.view!, 1);
    await target.request('fill', { region: remoteShared, seed: 7 });
    const src = [5, 6, 7, 50]; // remote
    const dst = [0, 1, 2, 33]; // local
    const plan = agent.prepare({
      op: 'READ',
      peer: peer.name,
      local,
      remote: remoteShared,
      pieces: {
        localOffsets: Float64Array.from(dst, (b) => b * BLOCK),
        remoteOffsets: Float64Array.from(src, (b) => b * BLOCK),
        lengths: BLOCK,
      },
      backend,
    });
    // Consecutive pieces (5,6,7 -> 0,1,2) are merged into one.
    expect(plan.pieces).toBe(2);
    expect(plan.requestedPieces).toBe(4);
    await plan.post();
    src.forEach((s, i) => {
      expect(sha256(local.view!.subarray(dst[i]! * BLOCK, (dst[i]! + 1) * BLOCK))).toBe(
        sha256(patternBytes(BLOCK, 7, s * BLOCK)),
      );
    });
    expect(sha256(local.view!.subarray(3 * BLOCK, 4 * BLOCK))).toBe(sha256(patternBytes(BLOCK, 1, 3 * BLOCK)));
  });

  it('reaches plain (unshared) host memory of the peer', async () => {
    fillPattern(local.view!, 1);
    const plan = agent.prepare({
      op: 'WRITE',
      peer: peer.name,
      local,
      remote: remotePlain,
      pieces: {
        strided: {
          localStart: 0,
          localStride: 2 * BLOCK,
          remoteStart: BLOCK,
          remoteStride: 2 * BLOCK,
          count: 8,
          length: BLOCK,
        },
      },
      backend,
    });
    await plan.post();
    for (let i = 0; i < 8; i++) {
      const { sha256: got } = await target.request<{ sha256: string }>('sha256', {
        region: remotePlain,
        offset: BLOCK + i * 2 * BLOCK,
        length: BLOCK,
      });
      expect(got).toBe(sha256(patternBytes(BLOCK, 1, i * 2 * BLOCK)));
    }
  });

  it('a notification arrives after the data of its transfer is visible at the target', async () => {
    fillPattern(local.view!, 21);
    for (let round = 0; round < 5; round++) {
      const offset = ((round * 13) % BLOCKS) * BLOCK;
      const plan = agent.prepare({
        op: 'WRITE',
        peer: peer.name,
        local,
        remote: remoteShared,
        pieces: {
          localOffsets: Float64Array.of(0),
          remoteOffsets: Float64Array.of(offset),
          lengths: 4 * BLOCK > BLOCK * BLOCKS - offset ? BLOCK : 4 * BLOCK,
        },
        backend,
      });
      const length = plan.bytes;
      const note = JSON.stringify({ round, check: { region: remoteShared, offset, length } });
      await plan.post({ notify: note });
      const event = await target.nextEvent((e) => e.event === 'notification' && e.text === note);
      expect(event.from).toBe(agent.name);
      expect(event.sha256, `round ${round}`).toBe(sha256(local.view!.subarray(0, length)));
    }
  });

  it('plain notifications go both ways', async () => {
    await agent.notify(peer.name, 'hello target');
    expect((await target.nextEvent((e) => e.text === 'hello target')).from).toBe(agent.name);
    const arrived = agent.waitForNotification({ from: peer.name, timeoutMs: 10_000 });
    await target.request('notify', { peer: agent.name, message: 'hello initiator' });
    expect((await arrived).message.toString()).toBe('hello initiator');
  });

  it('rejects out-of-bounds pieces before anything moves', async () => {
    await target.request('fill', { region: remoteShared, seed: 7 });
    const before = await target.request<{ sha256: string }>('sha256', {
      region: remoteShared,
      offset: 0,
      length: BLOCK * BLOCKS,
    });
    const bad = (remoteOffsets: number[], localOffsets = [0, BLOCK]) =>
      agent.prepare({
        op: 'WRITE',
        peer: peer.name,
        local,
        remote: remoteShared,
        pieces: {
          localOffsets: Float64Array.from(localOffsets),
          remoteOffsets: Float64Array.from(remoteOffsets),
          lengths: BLOCK,
        },
        backend,
      });
    expect(() => bad([0, BLOCK * BLOCKS])).toThrow(OutOfBoundsError);
    expect(() => bad([0, BLOCK * BLOCKS - 1])).toThrow(/piece 1: remote offset/);
    expect(() => bad([0, BLOCK], [0, BLOCK * BLOCKS])).toThrow(/piece 1: local offset/);
    expect(() => bad([0, -BLOCK])).toThrow(BadDescriptorError);
    expect(() => bad([0, 0.5])).toThrow(BadDescriptorError);
    const after = await target.request<{ sha256: string }>('sha256', {
      region: remoteShared,
      offset: 0,
      length: BLOCK * BLOCKS,
    });
    expect(after.sha256).toBe(before.sha256);
  });

  it('rejects unknown peers, unregistered regions and impossible backends with typed errors', async () => {
    const pieces = { localOffsets: Float64Array.of(0), remoteOffsets: Float64Array.of(0), lengths: 16 };
    expect(() => agent.prepare({ op: 'WRITE', peer: 'nobody', local, remote: remoteShared, pieces })).toThrow(
      UnknownPeerError,
    );
    expect(() => agent.prepare({ op: 'WRITE', peer: peer.name, local, remote: 999, pieces })).toThrow(
      NotRegisteredError,
    );
    expect(() =>
      agent.prepare({ op: 'WRITE', peer: peer.name, local, remote: remoteShared, pieces, backend: 'cuda-ipc' }),
    ).toThrow(BackendUnavailableError);
    // nccl moves GPU memory only; without CUDA or NCCL the agent says why it is not offered.
    expect(() =>
      agent.prepare({ op: 'WRITE', peer: peer.name, local, remote: remoteShared, pieces, backend: 'nccl' }),
    ).toThrow(agent.backends.includes('nccl') ? /device memory/ : /nccl unavailable: .+/);
    if (!agent.backends.includes('nccl')) expect(agent.ncclUnavailableReason).toMatch(/unavailable/);
    const scratch = agent.allocShared(4096);
    const plan = agent.prepare({ op: 'WRITE', peer: peer.name, local: scratch, remote: remoteShared, pieces, backend });
    agent.deregister(scratch);
    await expect(plan.post()).rejects.toBeInstanceOf(NotRegisteredError);
    // The agent is still healthy after all of that.
    const ok = agent.prepare({ op: 'WRITE', peer: peer.name, local, remote: remoteShared, pieces, backend });
    await ok.post();
  });

  it('warmup: nothing to open for host memory, so it resolves; an unknown peer is a typed error', async () => {
    expect(await agent.warmup(peer.name)).toEqual({ deviceRegions: 0 });
    expect(await agent.warmup(peer.name)).toEqual({ deviceRegions: 0 }); // again: still nothing to do
    await expect(agent.warmup('nobody')).rejects.toBeInstanceOf(UnknownPeerError);
    const pieces = { localOffsets: Float64Array.of(0), remoteOffsets: Float64Array.of(0), lengths: BLOCK };
    fillPattern(local.view!.subarray(0, BLOCK), 31);
    await agent.prepare({ op: 'WRITE', peer: peer.name, local, remote: remoteShared, pieces, backend }).post();
    const there = await target.request<{ sha256: string }>('sha256', {
      region: remoteShared,
      offset: 0,
      length: BLOCK,
    });
    expect(there.sha256).toBe(sha256(local.view!.subarray(0, BLOCK)));
    fillPattern(local.view!, 1); // as the other cases expect it
  });

  /** A WRITE plan of one piece into the target's shared region. */
  const write = (from: number, to: number, length: number) =>
    agent.prepare({
      op: 'WRITE',
      peer: peer.name,
      local,
      remote: remoteShared,
      pieces: { localOffsets: Float64Array.of(from), remoteOffsets: Float64Array.of(to), lengths: length },
      backend,
    });

  it('an already-aborted signal rejects without moving anything', async () => {
    const plan = agent.prepare({
      op: 'WRITE',
      peer: peer.name,
      local,
      remote: remoteShared,
      pieces: { localOffsets: Float64Array.of(0), remoteOffsets: Float64Array.of(0), lengths: BLOCK },
      backend,
    });
    const controller = new AbortController();
    controller.abort();
    await expect(plan.post({ signal: controller.signal })).rejects.toBeInstanceOf(CanceledError);
  });

  it('transfers land in post order: a mid-size post does not overtake a big one still running', async () => {
    fillPattern(local.view!, 1);
    const whole = write(0, 0, BLOCK * BLOCKS);
    // 512 KiB: small enough for shm to copy it on this thread when nothing else is in progress.
    const over = write(56 * BLOCK, 0, 8 * BLOCK);
    await over.post(); // maps the target region (on shm), so the next one could run at once
    await Promise.all([whole.post(), over.post()]);
    const { sha256: got } = await target.request<{ sha256: string }>('sha256', {
      region: remoteShared,
      offset: 0,
      length: 8 * BLOCK,
    });
    expect(got).toBe(sha256(patternBytes(8 * BLOCK, 1, 56 * BLOCK)));
  });

  it('a small post with nothing else in flight is done by the time post() returns (shm); posts settle in post order', async () => {
    fillPattern(local.view!, 3);
    const small = write(5 * BLOCK, 2 * BLOCK, BLOCK);
    await small.post(); // maps the target region (on shm)
    await new Promise((resolve) => setTimeout(resolve, 5)); // the agent's thread has long finished
    let settled = false;
    const posted = small.post().then(() => (settled = true));
    // A few microtask turns, no event-loop turn: only a post settled during the call can be seen here.
    for (let i = 0; i < 3; i++) await Promise.resolve();
    expect(settled).toBe(backend === 'shm');
    await posted;
    const { sha256: got } = await target.request<{ sha256: string }>('sha256', {
      region: remoteShared,
      offset: 2 * BLOCK,
      length: BLOCK,
    });
    expect(got).toBe(sha256(patternBytes(BLOCK, 3, 5 * BLOCK)));

    // Posted after a big one, small and mid-size posts settle after it: here the big one has finished
    // (this thread is kept busy meanwhile), but its completion has yet to reach JavaScript.
    const whole = write(0, 0, BLOCK * BLOCKS);
    const mid = write(0, 0, 8 * BLOCK);
    const order: string[] = [];
    const done = [whole.post().then(() => order.push('whole'))];
    const until = performance.now() + 20;
    while (performance.now() < until);
    done.push(
      mid.post().then(() => order.push('mid')),
      small.post().then(() => order.push('small')),
    );
    await Promise.all(done);
    if (backend !== 'ucx') expect(order).toEqual(['whole', 'mid', 'small']);
  });

  it('posts the same plan many times, concurrently', async () => {
    const plan = agent.prepare({
      op: 'WRITE',
      peer: peer.name,
      local,
      remote: remoteShared,
      pieces: {
        strided: {
          localStart: 0,
          localStride: BLOCK,
          remoteStart: 0,
          remoteStride: BLOCK,
          count: BLOCKS,
          length: 4096,
        },
      },
      backend,
    });
    await Promise.all(Array.from({ length: 50 }, () => plan.post()));
  });
});

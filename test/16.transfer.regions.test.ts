import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  RemoteDisconnectError,
  RemoteRegionGoneError,
  TransferAgent,
  type Region,
  type RemotePeer,
  type TransferPlan,
} from '../lib/index.js';
import { fillPattern } from './helpers/pattern.js';
import { PeerProcess } from './helpers/peer.js';

// The life of a remote region: the target deregisters one and allocates another, which reuses the first
// one's memfd number (the kernel hands out the lowest free fd). Whatever the initiator knows (fresh
// metadata, stale metadata, a mapping made before), a transfer to the region that went fails with
// RemoteRegionGoneError, the region that took its place is untouched, and no process dies of a signal.
// Bytes of the new region are checked at the target.
const BIG = 1 << 20;
const SMALL = 4 << 10;

/** Waits (bounded) until `check` holds: for what the target tells the initiator asynchronously. */
async function eventually(check: () => boolean, what: string): Promise<void> {
  for (let i = 0; i < 500; i++) {
    if (check()) return;
    await new Promise((r) => setTimeout(r, 10));
  }
  throw new Error(`never: ${what}`);
}

describe.each(['shm', 'tcp', 'ucx'] as const)('remote regions that go away, over %s', (backend) => {
  let target: PeerProcess;
  let agent: TransferAgent;
  let local: Region;
  let skip = '';

  const metadataOf = async () =>
    Buffer.from((await target.request<{ metadata: string }>('metadata')).metadata, 'base64');
  const allocShared = async (bytes: number, seed: number) =>
    (await target.request<{ region: { id: number } }>('allocShared', { bytes, seed })).region.id;
  const sha = async (region: number, length: number) =>
    (await target.request<{ sha256: string }>('sha256', { region, offset: 0, length })).sha256;
  const plan = (peer: string, remote: number, offset: number): TransferPlan =>
    agent.prepare({
      op: 'WRITE',
      peer,
      local,
      remote,
      pieces: { localOffsets: Float64Array.of(0), remoteOffsets: Float64Array.of(offset), lengths: 4096 },
      ...(backend !== 'shm' ? { backend } : {}),
    });
  const goneAt = (peer: string, remote: number) => {
    try {
      plan(peer, remote, 0);
      return false;
    } catch (error) {
      return error instanceof RemoteRegionGoneError;
    }
  };

  beforeAll(async () => {
    agent = await TransferAgent.create({ name: `regions-initiator-${backend}` });
    if (backend === 'ucx' && !agent.backends.includes('ucx')) skip = agent.ucxUnavailableReason;
    local = agent.allocShared(BIG);
    fillPattern(local.view!, 3);
    target = await PeerProcess.start();
    await target.request('create', { name: `regions-target-${backend}` });
    await target.request('load', { metadata: Buffer.from(agent.metadata()).toString('base64') });
  });

  afterAll(async () => {
    await agent?.dispose();
    await target?.stop();
  });

  it('a reloaded peer lists exactly its regions; a WRITE to one it deregistered fails, at any offset, and its successor is untouched', async (ctx) => {
    if (skip) return ctx.skip(`ucx unavailable: ${skip}`);
    const a = await allocShared(BIG, 7);
    const stale = await metadataOf();
    const peer = agent.loadRemote(stale);
    const atStart = plan(peer.name, a, 0);
    const atMiddle = plan(peer.name, a, BIG / 2);
    await target.request('deregister', { region: a });
    const b = await allocShared(SMALL, 9);
    const before = await sha(b, SMALL);

    const fresh: RemotePeer = agent.loadRemote(await metadataOf());
    expect(fresh.regions.map((r) => r.id)).toEqual([b]);
    await expect(atStart.post()).rejects.toBeInstanceOf(RemoteRegionGoneError);
    await expect(atMiddle.post()).rejects.toBeInstanceOf(RemoteRegionGoneError); // was: SIGBUS here (shm)
    expect(() => plan(peer.name, a, 0)).toThrow(RemoteRegionGoneError);
    // An older blob changes nothing: the region stays gone, its successor stays listed.
    expect(agent.loadRemote(stale).regions.map((r) => r.id)).toEqual([b]);
    await expect(atMiddle.post()).rejects.toBeInstanceOf(RemoteRegionGoneError);
    expect(await sha(b, SMALL)).toBe(before);
    // The region that is there works.
    await plan(peer.name, b, 0).post();
    expect(await sha(b, SMALL)).not.toBe(before);
    await target.request('deregister', { region: b });
  });

  it('a WRITE to a region deregistered after the metadata was loaded fails, without a reload', async (ctx) => {
    if (skip) return ctx.skip(`ucx unavailable: ${skip}`);
    const a = await allocShared(BIG, 7);
    const peer = agent.loadRemote(await metadataOf());
    const atStart = plan(peer.name, a, 0);
    const atMiddle = plan(peer.name, a, BIG / 2);
    await target.request('deregister', { region: a });
    const b = await allocShared(SMALL, 9);
    const before = await sha(b, SMALL);
    // shm checks the file behind the memfd before mapping it, tcp asks the target; ucx moves bytes
    // without asking, so it waits until the target's word that the region is gone has arrived.
    if (backend === 'ucx') await eventually(() => goneAt(peer.name, a), 'the initiator hears the region is gone');
    await expect(atMiddle.post()).rejects.toBeInstanceOf(RemoteRegionGoneError);
    await expect(atStart.post()).rejects.toBeInstanceOf(RemoteRegionGoneError);
    expect(() => plan(peer.name, a, 0)).toThrow(RemoteRegionGoneError);
    expect(await sha(b, SMALL)).toBe(before);
    await target.request('deregister', { region: b });
  });

  it('a region already written (mapped, for shm) and then deregistered fails once the target says so', async (ctx) => {
    if (skip) return ctx.skip(`ucx unavailable: ${skip}`);
    const a = await allocShared(BIG, 7);
    const peer = agent.loadRemote(await metadataOf());
    const write = plan(peer.name, a, BIG / 2);
    await write.post();
    await target.request('deregister', { region: a });
    const b = await allocShared(SMALL, 9);
    const before = await sha(b, SMALL);
    await eventually(() => goneAt(peer.name, a), 'the initiator hears the region is gone');
    await expect(write.post()).rejects.toBeInstanceOf(RemoteRegionGoneError);
    expect(await sha(b, SMALL)).toBe(before);
    expect(agent.loadRemote(await metadataOf()).regions.map((r) => r.id)).toEqual([b]);
    // A peer that is gone itself is reported as such, whatever regions it had removed.
    agent.removeRemote(peer.name);
    await expect(write.post()).rejects.toBeInstanceOf(RemoteDisconnectError);
    await target.request('deregister', { region: b });
  });
});

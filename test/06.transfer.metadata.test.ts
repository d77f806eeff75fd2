import { readFileSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  IncompatibleMetadataError,
  MetadataError,
  RemoteDisconnectError,
  TransferAgent,
  UnknownPeerError,
  type Region,
} from '../lib/index.js';
import { sha256 } from './helpers/pattern.js';
import { PeerProcess } from './helpers/peer.js';

function crc32(bytes: Uint8Array): number {
  let c = 0xffffffff;
  for (const b of bytes) {
    c ^= b;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
  }
  return (c ^ 0xffffffff) >>> 0;
}

/** Rewrites a blob field and fixes the checksum, so that only the field is wrong. */
function patched(blob: Uint8Array, offset: number, bytes: number[]): Uint8Array {
  const out = Uint8Array.from(blob);
  bytes.forEach((b, i) => (out[offset + i] = b));
  new DataView(out.buffer).setUint32(out.length - 4, crc32(out.subarray(0, out.length - 4)), true);
  return out;
}

describe('transfer metadata', () => {
  let a: TransferAgent;
  let b: TransferAgent;
  let blob: Uint8Array;

  beforeAll(async () => {
    a = await TransferAgent.create({ name: 'meta-a' });
    b = await TransferAgent.create({ name: 'meta-b' });
    b.allocShared(4096);
    b.allocShared(8192);
    blob = b.metadata();
  });
  afterAll(async () => {
    await a?.dispose();
    await b?.dispose();
  });

  it('round-trips: name, incarnation and every region', () => {
    const peer = a.loadRemote(blob);
    expect(peer.name).toBe('meta-b');
    expect(peer.incarnation).toBe(b.incarnation);
    expect(peer.regions.map((r) => [r.kind, r.size])).toEqual([
      ['shared', 4096],
      ['shared', 8192],
    ]);
    expect(a.removeRemote('meta-b')).toBe(true);
    expect(a.removeRemote('meta-b')).toBe(false);
  });

  it('rejects malformed, truncated and corrupted blobs with MetadataError, changing nothing', () => {
    const cases: [string, Uint8Array][] = [
      ['empty', new Uint8Array(0)],
      ['random', Uint8Array.from({ length: 200 }, (_, i) => (i * 7919) & 0xff)],
      ['truncated', blob.subarray(0, blob.length - 9)],
      ['one byte short', blob.subarray(0, blob.length - 1)],
      [
        'bit flip',
        (() => {
          const x = Uint8Array.from(blob);
          x[40] = x[40]! ^ 1;
          return x;
        })(),
      ],
      ['trailing garbage', Uint8Array.from([...blob, 1, 2, 3])],
    ];
    for (const [what, bytes] of cases) {
      expect(() => a.loadRemote(bytes), what).toThrow(MetadataError);
    }
    // Nothing was loaded: the peer is still unknown.
    expect(() =>
      a.prepare({
        op: 'WRITE',
        peer: 'meta-b',
        local: a.allocShared(16),
        remote: 1,
        pieces: { localOffsets: Float64Array.of(0), remoteOffsets: Float64Array.of(0), lengths: 16 },
      }),
    ).toThrow(UnknownPeerError);
  });

  it('random blobs that start with the magic are corrupt (MetadataError), never "incompatible"', () => {
    // Seeded (mulberry32), bounded: 2000 blobs of 28..299 bytes, half with a length field that matches.
    let seed = 0x7a11de;
    const random = () => {
      seed = (seed + 0x6d2b79f5) | 0;
      let t = seed;
      t = Math.imul(t ^ (t >>> 15), t | 1);
      t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
      return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
    };
    const magic = new TextEncoder().encode('TNDMAGNT');
    for (let i = 0; i < 2000; i++) {
      const bytes = Uint8Array.from({ length: 28 + Math.floor(random() * 272) }, () => Math.floor(random() * 256));
      bytes.set(magic);
      if (i % 2) new DataView(bytes.buffer).setUint32(12, bytes.length, true);
      let thrown: unknown;
      try {
        a.loadRemote(bytes);
      } catch (error) {
        thrown = error;
      }
      expect(thrown, `blob ${i}`).toBeInstanceOf(MetadataError);
      expect(thrown, `blob ${i}`).not.toBeInstanceOf(IncompatibleMetadataError);
    }
  });

  it('rejects another format version or build with IncompatibleMetadataError', () => {
    expect(() => a.loadRemote(patched(blob, 8, [1, 0]))).toThrow(IncompatibleMetadataError); // format 1: an older build
    expect(() => a.loadRemote(patched(blob, 16, [0xde, 0xad]))).toThrow(IncompatibleMetadataError);
    expect(() => a.loadRemote(patched(blob, 16, [0xde, 0xad]))).toThrow(/incompatible Tandem build/);
  });

  it('refuses an agent its own metadata', () => {
    expect(() => a.loadRemote(a.metadata())).toThrow(/own metadata/);
  });
});

describe('restarted and removed peers', () => {
  let agent: TransferAgent;
  let local: Region;

  beforeAll(async () => {
    agent = await TransferAgent.create({ name: 'restart-initiator' });
    local = agent.allocShared(1 << 20);
    local.view!.fill(0x5a);
  });
  afterAll(async () => {
    await agent?.dispose();
  });

  async function startTarget(name = 'restart-target') {
    const p = await PeerProcess.start();
    await p.request('create', { name });
    const region = (await p.request<{ region: { id: number } }>('allocShared', { bytes: 1 << 20, seed: 3 })).region.id;
    const { metadata } = await p.request<{ metadata: string }>('metadata');
    return { p, region, metadata: Buffer.from(metadata, 'base64') };
  }

  it('a restarted peer with the same name is a new peer; the old one is gone', async () => {
    const first = await startTarget();
    const peer1 = agent.loadRemote(first.metadata);
    const pieces = { localOffsets: Float64Array.of(0), remoteOffsets: Float64Array.of(0), lengths: 4096 };
    const plan1 = agent.prepare({ op: 'WRITE', peer: peer1.name, local, remote: first.region, pieces, backend: 'tcp' });
    await plan1.post();

    first.p.child.kill('SIGKILL');
    await first.p.exited;
    // The dead peer's plans reject with RemoteDisconnectError, promptly.
    const t0 = Date.now();
    await expect(plan1.post()).rejects.toBeInstanceOf(RemoteDisconnectError);
    expect(Date.now() - t0).toBeLessThan(5_000);

    const second = await startTarget();
    try {
      const peer2 = agent.loadRemote(second.metadata);
      expect(peer2.name).toBe(peer1.name);
      expect(peer2.incarnation).not.toBe(peer1.incarnation);
      // Old plans still refer to the old incarnation and keep failing; new ones work.
      await expect(plan1.post()).rejects.toBeInstanceOf(RemoteDisconnectError);
      const plan2 = agent.prepare({ op: 'WRITE', peer: peer2.name, local, remote: second.region, pieces });
      await plan2.post();
      const { sha256: got } = await second.p.request<{ sha256: string }>('sha256', {
        region: second.region,
        offset: 0,
        length: 4096,
      });
      expect(got).toBe(sha256(local.view!.subarray(0, 4096)));

      // Removed, then re-added from the same metadata: works again.
      expect(agent.removeRemote(peer2.name)).toBe(true);
      await expect(plan2.post()).rejects.toBeInstanceOf(RemoteDisconnectError);
      agent.loadRemote(second.metadata);
      await agent.prepare({ op: 'WRITE', peer: peer2.name, local, remote: second.region, pieces }).post();
    } finally {
      await second.p.stop();
    }
  });

  it("lets go of a peer's shared memory once the peer is removed, replaced or gone", async () => {
    const name = 'release-target';
    // Our mappings of the peer's regions: its memfd is labelled after the agent.
    const mapped = () =>
      readFileSync('/proc/self/maps', 'utf8')
        .split('\n')
        .filter((line) => line.includes(`/memfd:tandem:${name} `)).length;
    const eventually = async (want: number, what: string) => {
      for (let i = 0; i < 500 && mapped() !== want; i++) await new Promise((r) => setTimeout(r, 10));
      expect(mapped(), what).toBe(want);
    };
    const pieces = { localOffsets: Float64Array.of(0), remoteOffsets: Float64Array.of(0), lengths: 4096 };
    const write = async (t: Awaited<ReturnType<typeof startTarget>>) => {
      const peer = agent.loadRemote(t.metadata);
      await agent.prepare({ op: 'WRITE', peer: peer.name, local, remote: t.region, pieces, backend: 'shm' }).post();
    };

    const first = await startTarget(name);
    const second = await startTarget(name);
    try {
      await write(first);
      expect(mapped(), 'a shm write maps the target region').toBe(1);
      // A mid-size post (one the agent may copy on this thread) to the removed peer fails cleanly.
      const mid = agent.prepare({
        op: 'WRITE',
        peer: name,
        local,
        remote: first.region,
        pieces: { localOffsets: Float64Array.of(0), remoteOffsets: Float64Array.of(0), lengths: 512 << 10 },
        backend: 'shm',
      });
      await mid.post();
      expect(agent.removeRemote(name)).toBe(true);
      await expect(mid.post()).rejects.toBeInstanceOf(RemoteDisconnectError);
      await eventually(0, 'removed');

      await write(first);
      expect(mapped()).toBe(1);
      // A new incarnation under the same name replaces the old one, whose mapping goes.
      await write(second);
      await eventually(1, 'replaced');

      // A peer whose process is gone: its connection closes and its mapping goes.
      second.p.child.kill('SIGKILL');
      await second.p.exited;
      await eventually(0, 'gone');
    } finally {
      await first.p.stop();
      await second.p.stop();
    }
  });
});

import { randomBytes } from 'node:crypto';
import { once } from 'node:events';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { connect } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { InsecureListenError, PeerRejectedError, TransferAgent, type Region } from '../lib/index.js';
import { handshakeProof, sameProof } from '../lib/transfer/auth.js';
import { fillPattern, sha256 } from './helpers/pattern.js';
import { PeerProcess } from './helpers/peer.js';

// Who may touch an agent's registered memory. Local peers: only processes of the agent's uid (or of
// allowedUids), by their socket credentials; the kernel's ptrace rules keep other uids out of the direct
// paths (/proc/<pid>/fd mappings, process_vm_writev) even when they are let in. Shared secret: a mutual
// HMAC proof at every connection; a listener beyond loopback needs one (or trustNetwork).

const NOBODY = 65534;
const REGION = 1 << 20;
const b64 = (bytes: Uint8Array) => Buffer.from(bytes).toString('base64');

/** Posts a WRITE of 4 KiB from the peer process; resolves with the error's code ('' when it succeeded). */
async function writeFrom(peer: PeerProcess, target: string, local: number, remote: number, backend: 'shm' | 'tcp') {
  try {
    await peer.request('post', {
      op: 'WRITE',
      peer: target,
      local,
      remote,
      localOffsets: [0],
      remoteOffsets: [0],
      length: 4096,
      backend,
    });
    return { code: '', message: '' };
  } catch (error) {
    return error as { code: string; message: string };
  }
}

/**
 * The same metadata with another host key: the loader takes the agent for one on another host, so the
 * connection goes over tcp (to its loopback listener) instead of the unix socket.
 */
function asRemoteHost(blob: Uint8Array): Uint8Array {
  const out = Uint8Array.from(blob);
  const view = new DataView(out.buffer);
  const nameLength = view.getUint16(44, true);
  const hostKeyAt = 46 + nameLength + 2;
  out[hostKeyAt] = out[hostKeyAt] === 0x58 ? 0x59 : 0x58;
  let c = 0xffffffff;
  for (const b of out.subarray(0, out.length - 4)) {
    c ^= b;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
  }
  view.setUint32(out.length - 4, (c ^ 0xffffffff) >>> 0, true);
  return out;
}

describe('local peers of another uid', () => {
  const notRoot = process.getuid?.() !== 0 ? 'needs root to start a peer process as nobody' : '';
  let guard: TransferAgent;
  let region: Region;
  beforeEach((ctx) => {
    if (notRoot) ctx.skip(notRoot);
  });
  beforeAll(async () => {
    if (notRoot) return;
    guard = await TransferAgent.create({ name: 'guard' });
    region = guard.allocShared(REGION);
    fillPattern(region.view!, 5);
  });
  afterAll(async () => {
    await guard?.dispose();
  });

  async function stranger(name: string, metadata: Uint8Array) {
    const p = await PeerProcess.start({ uid: NOBODY, gid: NOBODY });
    const created = await p.request<{ uid: number }>('create', { name });
    expect(created.uid).toBe(NOBODY);
    const src = (await p.request<{ region: { id: number } }>('allocShared', { bytes: 4096, seed: 9 })).region.id;
    await p.request('load', { metadata: b64(metadata) });
    return { p, src };
  }

  it('are refused at the handshake: PeerRejectedError on their side, nothing written, this agent healthy', async () => {
    const before = sha256(region.view!);
    const { p, src } = await stranger('stranger', guard.metadata());
    try {
      for (const backend of ['tcp', 'shm'] as const) {
        const result = await writeFrom(p, 'guard', src, region.id, backend);
        expect(result.code, backend).toBe('TANDEM_PEER_REJECTED');
        expect(result.message).toMatch(/uid 65534/);
      }
      expect(sha256(region.view!)).toBe(before);
    } finally {
      await p.stop();
    }
    // A peer of this uid still gets in.
    const friend = await PeerProcess.start();
    try {
      await friend.request('create', { name: 'friend' });
      const src2 = (await friend.request<{ region: { id: number } }>('allocShared', { bytes: 4096, seed: 9 })).region
        .id;
      await friend.request('load', { metadata: b64(guard.metadata()) });
      expect((await writeFrom(friend, 'guard', src2, region.id, 'shm')).code).toBe('');
      expect(sha256(region.view!)).not.toBe(before);
    } finally {
      await friend.stop();
    }
  });

  it('are refused over loopback tcp as well (their uid found in /proc/net/tcp)', async () => {
    const before = sha256(region.view!);
    const { p, src } = await stranger('tcp-stranger', asRemoteHost(guard.metadata()));
    try {
      const result = await writeFrom(p, 'guard', src, region.id, 'tcp');
      expect(result.code).toBe('TANDEM_PEER_REJECTED');
      expect(result.message).toMatch(/uid 65534/);
      expect(sha256(region.view!)).toBe(before);
    } finally {
      await p.stop();
    }
  });

  it('allowedUids lets one in over the connection; the kernel still keeps it from mapping the memory (shm)', async () => {
    const open = await TransferAgent.create({ name: 'open-guard', allowedUids: [NOBODY] });
    const mine = open.allocShared(REGION);
    fillPattern(mine.view!, 5);
    const { p, src } = await stranger('allowed-stranger', open.metadata());
    try {
      const before = sha256(mine.view!);
      const shm = await writeFrom(p, 'open-guard', src, mine.id, 'shm');
      expect(shm.code).toBe('TANDEM_BACKEND_UNAVAILABLE'); // EACCES on /proc/<pid>/fd: ptrace rules
      expect(sha256(mine.view!)).toBe(before);
      expect((await writeFrom(p, 'open-guard', src, mine.id, 'tcp')).code).toBe('');
      expect(sha256(mine.view!)).not.toBe(before);
    } finally {
      await p.stop();
      await open.dispose();
    }
  });
});

describe('a shared secret', () => {
  const agents: TransferAgent[] = [];
  const make = async (name: string, options: { secret?: string } = {}) => {
    const agent = await TransferAgent.create({ name, ...options });
    agents.push(agent);
    return agent;
  };
  afterAll(async () => {
    for (const a of agents) await a.dispose();
  });

  /** WRITEs 4 KiB from `from` to a fresh region of `to` over tcp; the region's sha256 after, or the error. */
  async function write(from: TransferAgent, to: TransferAgent) {
    const local = from.allocShared(4096);
    fillPattern(local.view!, 11);
    const remote = to.allocShared(4096);
    const peer = from.loadRemote(asRemoteHost(to.metadata()));
    expect(peer.sameHost).toBe(false);
    try {
      await from
        .prepare({
          op: 'WRITE',
          peer: peer.name,
          local,
          remote: remote.id,
          pieces: { localOffsets: Float64Array.of(0), remoteOffsets: Float64Array.of(0), lengths: 4096 },
          backend: 'tcp',
        })
        .post();
      return sha256(remote.view!) === sha256(local.view!) ? 'written' : 'not written';
    } catch (error) {
      expect(sha256(remote.view!)).not.toBe(sha256(local.view!));
      return error;
    } finally {
      from.removeRemote(peer.name);
    }
  }

  it('the same secret on both sides: the transfer goes through (over tcp)', async () => {
    expect(await write(await make('s-a', { secret: 'one' }), await make('s-b', { secret: 'one' }))).toBe('written');
  });

  it('different secrets, or only one side with one: PeerRejectedError on the initiator, saying which', async () => {
    const target = await make('s-target', { secret: 'one' });
    const wrong = await write(await make('s-wrong', { secret: 'two' }), target);
    expect(wrong).toBeInstanceOf(PeerRejectedError);
    expect((wrong as Error).message).toMatch(/different secrets/);
    const none = await write(await make('s-none'), target);
    expect(none).toBeInstanceOf(PeerRejectedError);
    expect((none as Error).message).toMatch(/requires the shared secret/);
    const onlyInitiator = await write(await make('s-only', { secret: 'one' }), await make('s-open'));
    expect(onlyInitiator).toBeInstanceOf(PeerRejectedError);
    expect((onlyInitiator as Error).message).toMatch(/does not authenticate/);
    // The target refused them and goes on serving the right peer.
    expect(await write(await make('s-right', { secret: 'one' }), target)).toBe('written');
  });

  it('comes from TANDEM_TRANSFER_SECRET or the file TANDEM_TRANSFER_SECRET_FILE names', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'tandem-secret-'));
    const saved = { ...process.env };
    try {
      writeFileSync(join(dir, 'secret'), 'from-a-file\n');
      process.env.TANDEM_TRANSFER_SECRET_FILE = join(dir, 'secret');
      const fromFile = await make('s-file');
      delete process.env.TANDEM_TRANSFER_SECRET_FILE;
      process.env.TANDEM_TRANSFER_SECRET = 'from-a-file';
      const fromEnv = await make('s-env');
      delete process.env.TANDEM_TRANSFER_SECRET;
      expect(await write(fromFile, fromEnv)).toBe('written');
      expect(await write(await make('s-option', { secret: 'from-a-file' }), fromFile)).toBe('written');
      expect(await write(await make('s-other', { secret: 'another' }), fromEnv)).toBeInstanceOf(PeerRejectedError);
    } finally {
      process.env = saved;
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('handshakeProof (lib/transfer/auth.ts) is the construction the agents use: a TypeScript client gets in', async () => {
    const agent = await make('s-ts-target', { secret: 'shared' });
    const secret = new TextEncoder().encode('shared');
    const socket = connect(agent.tcpPort, '127.0.0.1');
    await once(socket, 'connect');
    const chunks: Buffer[] = [];
    socket.on('data', (d: Buffer) => chunks.push(d));
    const read = async (bytes: number) => {
      for (let i = 0; i < 500 && Buffer.concat(chunks).length < bytes; i++) await new Promise((r) => setTimeout(r, 10));
      const all = Buffer.concat(chunks);
      chunks.splice(0, chunks.length, all.subarray(bytes));
      return all.subarray(0, bytes);
    };
    const message = (type: number, payload: Uint8Array) => {
      const header = Buffer.alloc(24);
      header.writeUInt32LE(type, 0);
      header.writeBigUInt64LE(BigInt(payload.length), 16);
      return Buffer.concat([header, payload]);
    };
    const name = Buffer.from('ts-client');
    const ourNonce = randomBytes(32);
    const hello = Buffer.alloc(10 + name.length);
    hello.writeBigUInt64LE(42n, 0);
    hello.writeUInt16LE(name.length, 8);
    name.copy(hello, 10);
    socket.write(message(1, Buffer.concat([hello, ourNonce])));
    const header = await read(24);
    expect(header.readUInt32LE(0)).toBe(2); // HelloAck
    const ack = await read(Number(header.readBigUInt64LE(16)));
    const theirNonce = ack.subarray(ack.length - 64, ack.length - 32);
    const theirProof = ack.subarray(ack.length - 32);
    expect(sameProof(theirProof, handshakeProof(secret, 'target', ourNonce, theirNonce))).toBe(true);
    socket.write(message(12, handshakeProof(secret, 'initiator', ourNonce, theirNonce))); // Auth
    const heard = agent.waitForNotification({ from: 'ts-client', timeoutMs: 10_000 });
    socket.write(message(3, Buffer.from('proved in TypeScript'))); // Notify
    expect((await heard).message.toString()).toBe('proved in TypeScript');
    socket.destroy();
  });

  it('a listener beyond loopback needs one, unless the network is declared trusted', async () => {
    await expect(TransferAgent.create({ name: 'open-listener', tcpHost: '0.0.0.0' })).rejects.toBeInstanceOf(
      InsecureListenError,
    );
    // Allowed: with a secret, or trusted (each disposed at once; nothing connects to them).
    await (await TransferAgent.create({ name: 'secret-listener', tcpHost: '0.0.0.0', secret: 'one' })).dispose();
    await (await TransferAgent.create({ name: 'trusted-listener', tcpHost: '0.0.0.0', trustNetwork: true })).dispose();
    const saved = process.env.TANDEM_TRANSFER_TRUST_NETWORK;
    process.env.TANDEM_TRANSFER_TRUST_NETWORK = '1';
    try {
      await (await TransferAgent.create({ name: 'trusted-by-env', tcpHost: '0.0.0.0' })).dispose();
    } finally {
      if (saved === undefined) delete process.env.TANDEM_TRANSFER_TRUST_NETWORK;
      else process.env.TANDEM_TRANSFER_TRUST_NETWORK = saved;
    }
    // Loopback without a secret works as before.
    await (await TransferAgent.create({ name: 'loopback-listener', tcpHost: '127.0.0.1' })).dispose();
  });
});

import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BadArgumentError, TransferAgent, type Notification, type Region } from '../lib/index.js';
import { patternBytes, sha256 } from './helpers/pattern.js';
import { PeerProcess } from './helpers/peer.js';

// An agent made with notifications: 'poll' (this process, "poller") and initiators in another process
// ("sender") and in this one. Same host: senders write notifications into the poller's shared ring, and
// the socket carries what does not fit; takeNotifications() must give each sender's in order, after the
// data they follow, losing none.
const BLOCK = 64 << 10;
const BLOCKS = 32;

/** Takes notifications until `count` have come (this thread spins, as a polling process would). */
function takeUntil(
  agent: TransferAgent,
  count: number,
  ms = 10_000,
  check?: (n: Notification) => void,
): Notification[] {
  const out: Notification[] = [];
  const deadline = performance.now() + ms;
  while (out.length < count && performance.now() < deadline) {
    for (const n of agent.takeNotifications()) {
      check?.(n);
      out.push(n);
    }
  }
  return out;
}

/** Waits, letting the event loop run (the sender's answers come through it), until `count` have come. */
async function collect(agent: TransferAgent, count: number, ms = 10_000): Promise<Notification[]> {
  const out: Notification[] = [];
  const deadline = performance.now() + ms;
  while (out.length < count && performance.now() < deadline) {
    out.push(...agent.takeNotifications());
    if (out.length < count) await new Promise((resolve) => setTimeout(resolve, 2));
  }
  return out;
}

describe('polled notifications', () => {
  let sender: PeerProcess;
  let poller: TransferAgent;
  let region: Region;
  let senderRegion: number;
  let events = 0;

  beforeAll(async () => {
    poller = await TransferAgent.create({ name: 'poller', notifications: 'poll' });
    poller.on('notification', () => events++);
    region = poller.allocShared(BLOCK * BLOCKS);
    sender = await PeerProcess.start();
    await sender.request('create', { name: 'sender' });
    senderRegion = (await sender.request<{ region: { id: number } }>('allocShared', { bytes: BLOCK * BLOCKS, seed: 5 }))
      .region.id;
    const { metadata } = await sender.request<{ metadata: string }>('metadata');
    poller.loadRemote(Buffer.from(metadata, 'base64'));
    await sender.request('load', { metadata: Buffer.from(poller.metadata()).toString('base64') });
  });

  afterAll(async () => {
    await poller?.dispose();
    await sender?.stop();
  });

  it('bad options and calls for the other mode are typed errors', async () => {
    expect(poller.pollsNotifications).toBe(true);
    await expect(TransferAgent.create({ name: 'x', notifications: 'sometimes' as 'poll' })).rejects.toThrow(
      BadArgumentError,
    );
    await expect(poller.waitForNotification({ timeoutMs: 10 })).rejects.toThrow(BadArgumentError);
    const plain = await TransferAgent.create({ name: 'events-only' });
    try {
      expect(plain.pollsNotifications).toBe(false);
      expect(() => plain.takeNotifications()).toThrow(BadArgumentError);
    } finally {
      await plain.dispose();
    }
    expect(poller.takeNotifications()).toEqual([]);
  });

  it.each(['shm', 'tcp'] as const)(
    'over %s, each WRITE notification is taken after its data, in order with plain ones, and never as an event',
    async (backend) => {
      const rounds = 12;
      const sent: Promise<unknown>[] = [];
      const expected: string[] = [];
      for (let r = 0; r < rounds; r++) {
        const block = (r * 7 + (backend === 'tcp' ? 3 : 0)) % BLOCKS;
        const note = JSON.stringify({ backend, r, block });
        expected.push(note, `plain ${backend} ${r}`);
        // Sent without waiting: the sender's process runs them while this thread takes notifications.
        sent.push(
          sender.request('post', {
            op: 'WRITE',
            peer: 'poller',
            local: senderRegion,
            remote: region.id,
            localOffsets: [block * BLOCK],
            remoteOffsets: [block * BLOCK],
            length: BLOCK,
            backend,
            notify: note,
          }),
          sender.request('notify', { peer: 'poller', message: `plain ${backend} ${r}` }),
        );
      }
      const wrong: string[] = [];
      const taken = takeUntil(poller, 2 * rounds, 20_000, (n) => {
        const text = n.message.toString();
        if (!text.startsWith('{')) return;
        const { block } = JSON.parse(text) as { block: number };
        // Checked the moment it is taken: the block must hold the sender's bytes already.
        const here = sha256(region.view!.subarray(block * BLOCK, (block + 1) * BLOCK));
        if (here !== sha256(patternBytes(BLOCK, 5, block * BLOCK))) wrong.push(text);
      });
      await Promise.all(sent);
      // The sender's agent runs its posts and notifications in the order they were asked for.
      expect(taken.map((n) => n.message.toString())).toEqual(expected);
      expect(taken.every((n) => n.from === 'sender')).toBe(true);
      expect(wrong).toEqual([]);
      expect(events).toBe(0);
    },
  );

  it('nothing is lost or reordered when the ring is full or a notification is too big for it', async () => {
    // 48 notifications of 100 KiB (the ring holds 1 MiB) and, among them, some of 400 KiB (more than a
    // quarter of the ring: always over the socket), all sent before any is taken.
    const texts = Array.from(
      { length: 48 },
      (_, i) => `${String(i).padStart(2, '0')}:` + 'abcdefgh'[i % 8]!.repeat(i % 5 === 3 ? 400 << 10 : 100 << 10),
    );
    for (const text of texts) await sender.request('notify', { peer: 'poller', message: text });
    const taken = await collect(poller, texts.length);
    expect(taken.length).toBe(texts.length);
    const got = taken.map((n) => n.message.toString());
    expect(got.map((t) => t.slice(0, 3))).toEqual(texts.map((t) => t.slice(0, 3)));
    expect(got.every((t, i) => t === texts[i])).toBe(true);
    expect(poller.takeNotifications()).toEqual([]);
  });

  it('a WRITE the target refuses holds back no later notification (tcp)', async () => {
    const doomed = poller.allocShared(BLOCK);
    await sender.request('load', { metadata: Buffer.from(poller.metadata()).toString('base64') });
    poller.deregister(doomed);
    await expect(
      sender.request('post', {
        op: 'WRITE',
        peer: 'poller',
        local: senderRegion,
        remote: doomed.id,
        localOffsets: [0],
        remoteOffsets: [0],
        length: BLOCK,
        backend: 'tcp',
        notify: 'never delivered',
      }),
    ).rejects.toMatchObject({ code: 'TANDEM_REMOTE_REGION_GONE' }); // refused there, or known gone here first
    await sender.request('notify', { peer: 'poller', message: 'after the refused one' });
    expect((await collect(poller, 1)).map((n) => n.message.toString())).toEqual(['after the refused one']);
  });

  it('takeNotifications(max) takes at most max, leaving the rest in order', async () => {
    // Each notify() has resolved once its notification is in the ring (or on the socket).
    for (let i = 0; i < 5; i++) await sender.request('notify', { peer: 'poller', message: `m${i}` });
    const first = poller.takeNotifications(2);
    expect(first.map((n) => n.message.toString())).toEqual(['m0', 'm1']);
    const rest = await collect(poller, 3);
    expect(rest.map((n) => n.message.toString())).toEqual(['m2', 'm3', 'm4']);
  });

  it('a notify() from this process with nothing in flight is in the ring before it returns', async () => {
    const local = await TransferAgent.create({ name: 'local-sender' });
    try {
      local.loadRemote(poller.metadata());
      poller.loadRemote(local.metadata());
      await local.notify('poller', 'first'); // connects; the ring is mapped at the handshake
      expect((await collect(poller, 1)).map((n) => n.message.toString())).toEqual(['first']);
      // "Nothing in flight" includes the progress thread finishing the task that resolved the previous notify:
      // on a loaded machine it may not have returned yet, and then the call is queued instead (correct, slower).
      // So try a bounded number of times; whenever the call settles synchronously, its notification must
      // already be in the ring, and the fast path must be taken at least once.
      let fast = 0;
      for (let attempt = 0; attempt < 20 && fast === 0; attempt++) {
        await new Promise((resolve) => setTimeout(resolve, 5 * attempt));
        let settled = false;
        const message = `second ${attempt}`;
        const done = local.notify('poller', message).then(() => (settled = true));
        // No event-loop turn since the call: only a notification written during it can be taken here.
        const taken = poller.takeNotifications();
        for (let i = 0; i < 3; i++) await Promise.resolve();
        if (settled) {
          fast++;
          expect(taken.map((n) => [n.from, n.message.toString()])).toEqual([['local-sender', message]]);
        } else {
          await done;
          const late = [...taken, ...(await collect(poller, 1 - taken.length))];
          expect(late.map((n) => n.message.toString())).toEqual([message]);
        }
        await done;
      }
      expect(fast).toBe(1);
    } finally {
      await local.dispose();
    }
  });

  it('what a sender wrote before it exited is still taken, in order', async () => {
    const gone = await PeerProcess.start();
    await gone.request('create', { name: 'short-lived' });
    await gone.request('load', { metadata: Buffer.from(poller.metadata()).toString('base64') });
    for (let i = 0; i < 6; i++) await gone.request('notify', { peer: 'poller', message: `last words ${i}` });
    await gone.stop();
    const taken = await collect(poller, 6);
    expect(taken.map((n) => [n.from, n.message.toString()])).toEqual(
      Array.from({ length: 6 }, (_, i) => ['short-lived', `last words ${i}`]),
    );
    expect(poller.takeNotifications()).toEqual([]);
  });
});

/**
 * The TCP request plane (lib/worker/request-plane.ts) on loopback: framing, the token handshake, reconnects,
 * the connect timeout and backpressure. Every wait is bounded; servers and clients close at the end.
 */
import { createServer, createConnection, type Server, type Socket } from 'node:net';
import { deserialize } from 'node:v8';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { BadArgumentError } from '../../lib/errors.js';
import type { FromWorker, ToWorker } from '../../lib/worker/protocol.js';
import {
  encodeFrame,
  FrameDecoder,
  FramedSocket,
  MAX_FRAME_BYTES,
  RequestPlaneError,
  RequestPlaneServer,
  WorkerClient,
  type FrontendConnection,
} from '../../lib/worker/request-plane.js';

const WAIT = { timeout: 10_000, interval: 10 };

const cleanups: (() => unknown)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

async function server(options: Parameters<typeof RequestPlaneServer.listen>[0] = {}) {
  const s = await RequestPlaneServer.listen({ token: undefined, ...options });
  cleanups.push(() => s.close());
  return s;
}

function client(port: number, options: Partial<ConstructorParameters<typeof WorkerClient>[0]> = {}) {
  const c = new WorkerClient({ host: '127.0.0.1', port, frontend: 'f1', ...options });
  cleanups.push(() => c.close());
  const events: string[] = [];
  const messages: FromWorker[] = [];
  c.on('up', () => events.push('up'));
  c.on('down', () => events.push('down'));
  c.on('refused', (reason) => events.push(`refused: ${reason}`));
  c.on('message', (m) => messages.push(m));
  return { c, events, messages };
}

describe('frames', () => {
  it('splits a byte stream into frames, whatever the chunking', () => {
    const payloads = [Buffer.from('a'), Buffer.alloc(0), Buffer.from('hello frames'), Buffer.alloc(70_000, 7)];
    const bytes = Buffer.concat(payloads.map(encodeFrame));
    for (const step of [1, 3, 5, 4096, bytes.length]) {
      const d = new FrameDecoder();
      const out: Buffer[] = [];
      for (let i = 0; i < bytes.length; i += step) out.push(...d.push(bytes.subarray(i, i + step)));
      expect(out.map((b) => Buffer.from(b))).toEqual(payloads);
    }
  });

  it('refuses a frame over the limit with a typed error', () => {
    const head = Buffer.alloc(4);
    head.writeUInt32BE(MAX_FRAME_BYTES + 1);
    expect(() => new FrameDecoder().push(head)).toThrow(RequestPlaneError);
  });
});

describe('request plane server and client', () => {
  it('carries protocol messages both ways, typed arrays included; request ids keep their frontend', async () => {
    const s = await server();
    const got: ToWorker[] = [];
    let conn: FrontendConnection | undefined;
    s.on('connection', (c) => {
      conn = c;
      c.on('message', (m) => got.push(m));
    });
    const { c, events, messages } = client(s.port);
    await vi.waitFor(() => expect(events).toEqual(['up']), WAIT);
    expect(conn!.frontend).toBe('f1');
    expect(c.send({ type: 'abort', requestId: 'f1/r1' })).toBe(true);
    await vi.waitFor(() => expect(got).toEqual([{ type: 'abort', requestId: 'f1/r1' }]), WAIT);
    const logprobs = [
      { tokenId: 5, logprob: -0.5, topTokenIds: Int32Array.of(1, 2), topLogprobs: Float32Array.of(-0.5, -1) },
    ];
    conn!.send({ type: 'tokens', requestId: 'f1/r1', tokenIds: [5, 6], logprobs, finishReason: null });
    await vi.waitFor(() => expect(messages).toHaveLength(1), WAIT);
    const m = messages[0] as Extract<FromWorker, { type: 'tokens' }>;
    expect(m.logprobs![0]!.topTokenIds).toBeInstanceOf(Int32Array);
    expect([...m.logprobs![0]!.topTokenIds]).toEqual([1, 2]);
  });

  it('binding beyond loopback needs a token', async () => {
    await expect(RequestPlaneServer.listen({ host: '192.0.2.1', token: undefined })).rejects.toThrow(BadArgumentError);
    const previous = process.env.TANDEM_TOKEN;
    delete process.env.TANDEM_TOKEN;
    try {
      await expect(RequestPlaneServer.listen({ host: '0.0.0.0' })).rejects.toThrow(/TANDEM_TOKEN/);
    } finally {
      if (previous !== undefined) process.env.TANDEM_TOKEN = previous;
    }
  });

  it('with a token, a frontend without it or with another is refused, and sends nothing through', async () => {
    const s = await server({ token: 'sesame' });
    const refusals: string[] = [];
    const got: ToWorker[] = [];
    s.on('refused', (r) => refusals.push(r));
    s.on('connection', (c) => c.on('message', (m) => got.push(m)));
    const none = client(s.port);
    const wrong = client(s.port, { token: 'open up' });
    await vi.waitFor(() => expect(refusals).toHaveLength(2), WAIT);
    await vi.waitFor(() => {
      expect(none.events).toEqual([expect.stringMatching(/^refused: wrong or missing token/)]);
      expect(wrong.events).toEqual([expect.stringMatching(/^refused: wrong or missing token/)]);
    }, WAIT);
    expect(none.c.send({ type: 'kvSnapshotRequest' })).toBe(false);
    const right = client(s.port, { token: 'sesame' });
    await vi.waitFor(() => expect(right.events).toEqual(['up']), WAIT);
    right.c.send({ type: 'kvSnapshotRequest' });
    await vi.waitFor(() => expect(got).toEqual([{ type: 'kvSnapshotRequest' }]), WAIT);
    expect(s.frontends()).toHaveLength(1);
  });

  it('reconnects after the connection breaks, and after the worker comes back on its port', async () => {
    const s = await server();
    const { c, events } = client(s.port);
    await vi.waitFor(() => expect(events).toEqual(['up']), WAIT);
    s.frontends()[0]!.close();
    await vi.waitFor(() => expect(events).toEqual(['up', 'down', 'up']), WAIT);
    const port = s.port;
    await s.close();
    await vi.waitFor(() => expect(events).toEqual(['up', 'down', 'up', 'down']), WAIT);
    expect(c.send({ type: 'kvSnapshotRequest' })).toBe(false);
    const again = await server({ port });
    await vi.waitFor(() => expect(events).toEqual(['up', 'down', 'up', 'down', 'up']), WAIT);
    expect(again.frontends()).toHaveLength(1);
  });

  it('a listener that never answers the handshake: the connect times out and is retried', async () => {
    const sockets: Socket[] = [];
    const mute: Server = createServer((socket) => sockets.push(socket));
    await new Promise<void>((resolve) => mute.listen(0, '127.0.0.1', resolve));
    cleanups.push(() => new Promise<void>((resolve) => mute.close(() => resolve())));
    cleanups.push(() => sockets.forEach((s) => s.destroy()));
    const lines: string[] = [];
    const { events } = client((mute.address() as { port: number }).port, {
      connectTimeoutMs: 200,
      log: (l) => lines.push(l),
    });
    await vi.waitFor(() => expect(sockets.length).toBeGreaterThanOrEqual(2), WAIT);
    expect(lines[0]).toMatch(/handshake within 200 ms/);
    expect(events).toEqual([]);
  });
});

describe('backpressure', () => {
  it('a worker closes the connection of a frontend that stops reading, rather than drop its messages', async () => {
    const s = await server({ maxQueuedBytes: 1 << 20 });
    let conn: FrontendConnection | undefined;
    const closed: (Error | undefined)[] = [];
    s.on('connection', (c) => {
      conn = c;
      c.on('close', (error) => closed.push(error));
    });
    const { c } = client(s.port);
    await vi.waitFor(() => expect(conn).toBeDefined(), WAIT);
    // The frontend's process stops reading (its socket paused): the worker's sends pile up.
    (c as unknown as { connection: FramedSocket<FromWorker, ToWorker> }).connection.socket.pause();
    const tokenIds = Array.from({ length: 16 * 1024 }, (_, i) => i);
    let sent = 0;
    while (sent < 10_000 && conn!.send({ type: 'tokens', requestId: `f1/r${sent}`, tokenIds, finishReason: null }))
      sent++;
    expect(sent).toBeLessThan(10_000);
    expect(closed).toHaveLength(1);
    expect(closed[0]).toMatchObject({ code: 'TANDEM_REQUEST_PLANE_SLOW_READER' });
    expect(conn!.connected).toBe(false);
  });

  it('queues while the socket is full, refuses past the bound, and delivers everything queued in order', async () => {
    let peer: Socket | undefined;
    const sink = createServer((s) => {
      peer = s;
      s.pause(); // reads nothing: the sender's socket fills up
    });
    await new Promise<void>((resolve) => sink.listen(0, '127.0.0.1', resolve));
    cleanups.push(() => new Promise<void>((resolve) => sink.close(() => resolve())));
    const socket = createConnection({ host: '127.0.0.1', port: (sink.address() as { port: number }).port });
    await new Promise((resolve) => socket.once('connect', resolve));
    await vi.waitFor(() => expect(peer).toBeDefined(), WAIT);
    const framed = new FramedSocket<FromWorker, ToWorker>(socket, 4 << 20);
    cleanups.push(() => framed.close());
    const big = Array.from({ length: 64 * 1024 }, (_, i) => i % 1000); // ~ 200 KB as a frame
    let sent = 0;
    while (sent < 1000 && framed.send({ type: 'abort', requestId: `r${sent}`, promptIds: big } as ToWorker)) sent++;
    // Refused long before 1000 frames (~200 MB): the kernel's buffers plus the 4 MiB bound.
    expect(sent).toBeLessThan(1000);
    expect(sent).toBeGreaterThan(0);
    // The reader catches up: every accepted frame arrives, in order, and sending works again.
    const decoder = new FrameDecoder();
    const ids: string[] = [];
    peer!.on('data', (chunk: Buffer) => {
      for (const f of decoder.push(chunk)) ids.push((deserialize(f) as { requestId: string }).requestId);
    });
    peer!.resume();
    await vi.waitFor(() => expect(ids).toHaveLength(sent), { timeout: 20_000, interval: 20 });
    expect(ids).toEqual(Array.from({ length: sent }, (_, i) => `r${i}`));
    expect(framed.send({ type: 'kvSnapshotRequest' })).toBe(true);
  });
});

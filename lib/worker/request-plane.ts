/**
 * The request plane across processes and hosts: frontends reach workers over TCP, point to point. The
 * messages are lib/worker/protocol.ts's (ToWorker one way, FromWorker the other, KV events included), each
 * framed as a 4-byte big-endian length and its structured-clone bytes (node:v8, the format Node's 'advanced'
 * IPC uses, so typed arrays travel as they are). The embedded plane (Node IPC through the launcher) stays
 * the default on one machine; both are a `WorkerLink` to the router.
 *
 * Handshake, before any structured-clone frame is read (JSON frames):
 *   worker   -> frontend  { v: 1, nonce }                               its nonce (hex)
 *   frontend -> worker    { v: 1, frontend, nonce, proof? }            proof = HMAC(token, initiator, nonces)
 *   worker   -> frontend  { v: 1, ok: true } or { v: 1, error }        then the worker closes on error
 * The proof is lib/transfer/auth.ts's handshakeProof over the shared token (TANDEM_TOKEN). A worker that
 * binds beyond loopback refuses to start without a token; one with a token refuses frontends without it.
 *
 * Request ids on this plane carry their frontend (`<frontend>/<id>`): a worker answers a request on the
 * connection of the frontend that sent it, and sends worker-wide messages (heartbeat, KV events) to all.
 */
import { randomBytes } from 'node:crypto';
import { EventEmitter } from 'node:events';
import { createConnection, createServer, type Server, type Socket } from 'node:net';
import { deserialize, serialize } from 'node:v8';
import { BadArgumentError, TandemError } from '../errors.js';
import { handshakeProof, isLoopbackHost, sameProof } from '../transfer/index.js';
import type { FromWorker, ToWorker } from './protocol.js';

/** The environment variable that holds the shared token of the request plane. */
export const TOKEN_ENV = 'TANDEM_TOKEN';
/** Frames above this are a protocol error (the connection is closed). */
export const MAX_FRAME_BYTES = 256 << 20;
/** Bytes a connection may queue while the socket says it is full; beyond that send() refuses (backpressure). */
export const DEFAULT_MAX_QUEUED_BYTES = 64 << 20;
export const DEFAULT_CONNECT_TIMEOUT_MS = 3_000;
/** Reconnect backoff: the first delay, doubled per failure up to the max. */
export const RECONNECT_INITIAL_MS = 100;
export const RECONNECT_MAX_MS = 5_000;
const HANDSHAKE_TIMEOUT_MS = 5_000;
const PROTOCOL_VERSION = 1;

/**
 * The request plane as a router sends on it: to a worker by name; false when that worker cannot take the message
 * now (gone, not connected, or its queue full). Embedded: the launcher's IPC channels to its children
 * (lib/deploy/launcher.ts); across hosts: `ReachableWorkers` over TCP (lib/frontend/request-plane-frontend.ts). What
 * workers send comes back to the router's onMessage(from, message).
 */
export interface RequestPlane {
  send(worker: string, message: ToWorker): boolean;
}

/** A frontend was refused by a worker (no token, or the wrong one), or the other end broke the protocol. */
export class RequestPlaneError extends TandemError {}

/** The shared token: the option, else TANDEM_TOKEN; undefined when neither is set. */
export function resolveToken(token?: string, env: NodeJS.ProcessEnv = process.env): string | undefined {
  const t = token ?? env[TOKEN_ENV];
  if (t === '') throw new BadArgumentError(`the request-plane token (${TOKEN_ENV}) must not be empty`);
  return t;
}

/** Length-prefixed frames out of a byte stream. */
export class FrameDecoder {
  private chunks: Buffer[] = [];
  private buffered = 0;

  /** The whole frames the bytes so far complete. Throws RequestPlaneError on a frame over MAX_FRAME_BYTES. */
  push(chunk: Buffer): Buffer[] {
    this.chunks.push(chunk);
    this.buffered += chunk.length;
    const frames: Buffer[] = [];
    for (;;) {
      if (this.buffered < 4) break;
      const head = this.chunks.length === 1 ? this.chunks[0]! : Buffer.concat(this.chunks);
      this.chunks = [head];
      const length = head.readUInt32BE(0);
      if (length > MAX_FRAME_BYTES)
        throw new RequestPlaneError('TANDEM_REQUEST_PLANE_PROTOCOL', `frame of ${length} bytes is over the limit`);
      if (this.buffered < 4 + length) break;
      frames.push(head.subarray(4, 4 + length));
      const rest = head.subarray(4 + length);
      this.chunks = rest.length ? [rest] : [];
      this.buffered = rest.length;
    }
    return frames;
  }
}

export function encodeFrame(payload: Uint8Array): Buffer {
  const frame = Buffer.allocUnsafe(4 + payload.length);
  frame.writeUInt32BE(payload.length, 0);
  frame.set(payload, 4);
  return frame;
}

/**
 * A socket carrying frames, with backpressure: while socket.write() reports a full buffer, frames wait in a
 * queue that is written on 'drain'; once the queue holds maxQueuedBytes, send() refuses (returns false), or, with
 * `closeWhenFull`, closes the connection (a worker never drops a message: the frontend that reads too slowly loses
 * the connection, fails its requests there and reconnects).
 */
export class FramedSocket<In, Out> extends EventEmitter<{ message: [m: In]; close: [error?: Error] }> {
  private readonly decoder = new FrameDecoder();
  private queue: Buffer[] = [];
  private queuedBytes = 0;
  private blocked = false;
  private closed = false;

  constructor(
    readonly socket: Socket,
    private readonly maxQueuedBytes = DEFAULT_MAX_QUEUED_BYTES,
    private readonly closeWhenFull = false,
  ) {
    super();
    socket.setNoDelay(true);
    socket.on('drain', () => this.flush());
    socket.on('error', (error) => this.close(error));
    socket.on('close', () => this.close());
  }

  /** Starts reading structured-clone frames (after the handshake). */
  start(): void {
    this.socket.on('data', (chunk: Buffer) => {
      let frames: Buffer[];
      try {
        frames = this.decoder.push(chunk);
      } catch (error) {
        return this.close(error as Error);
      }
      for (const frame of frames) {
        if (this.closed) return;
        let message: In;
        try {
          message = deserialize(frame) as In;
        } catch (error) {
          return this.close(new RequestPlaneError('TANDEM_REQUEST_PLANE_PROTOCOL', `unreadable frame: ${error}`));
        }
        this.emit('message', message);
      }
    });
  }

  get connected(): boolean {
    return !this.closed;
  }

  /** False: the connection is closed, or its queue is full (the other end reads too slowly). */
  send(message: Out): boolean {
    if (this.closed) return false;
    const frame = encodeFrame(serialize(message));
    if (this.blocked) {
      if (this.queuedBytes + frame.length > this.maxQueuedBytes) {
        if (this.closeWhenFull)
          this.close(
            new RequestPlaneError(
              'TANDEM_REQUEST_PLANE_SLOW_READER',
              `the other end reads too slowly: ${this.queuedBytes} bytes queued`,
            ),
          );
        return false;
      }
      this.queue.push(frame);
      this.queuedBytes += frame.length;
      return true;
    }
    this.blocked = !this.socket.write(frame);
    return true;
  }

  private flush(): void {
    this.blocked = false;
    while (this.queue.length && !this.blocked) {
      const frame = this.queue.shift()!;
      this.queuedBytes -= frame.length;
      this.blocked = !this.socket.write(frame);
    }
  }

  close(error?: Error): void {
    if (this.closed) return;
    this.closed = true;
    this.queue = [];
    this.queuedBytes = 0;
    this.socket.destroy();
    this.emit('close', error);
  }
}

/** Reads one JSON frame (the handshake), with a deadline. Leaves the bytes after it unread in `rest`. */
function readJsonFrame(socket: Socket, timeoutMs: number): Promise<{ value: Record<string, unknown>; rest: Buffer[] }> {
  return new Promise((resolve, reject) => {
    const decoder = new FrameDecoder();
    const done = (error?: Error, value?: Record<string, unknown>, rest: Buffer[] = []) => {
      clearTimeout(timer);
      socket.off('data', onData);
      socket.off('close', onClose);
      socket.off('error', onError);
      if (error) reject(error);
      else resolve({ value: value!, rest });
    };
    const onData = (chunk: Buffer) => {
      let frames: Buffer[];
      try {
        frames = decoder.push(chunk);
      } catch (error) {
        return done(error as Error);
      }
      if (!frames.length) return;
      socket.pause();
      try {
        const value = JSON.parse(frames[0]!.toString('utf8')) as unknown;
        if (typeof value !== 'object' || value === null) throw new Error('not an object');
        // Frames that came in the same chunk are handed back, re-framed, to whoever reads next.
        done(undefined, value as Record<string, unknown>, frames.slice(1).map(encodeFrame));
      } catch (error) {
        done(new RequestPlaneError('TANDEM_REQUEST_PLANE_PROTOCOL', `bad handshake frame: ${error}`));
      }
    };
    const onClose = () => done(new RequestPlaneError('TANDEM_REQUEST_PLANE_CLOSED', 'connection closed in handshake'));
    const onError = (error: Error) => done(error);
    const timer = setTimeout(
      () => done(new RequestPlaneError('TANDEM_REQUEST_PLANE_TIMEOUT', `no handshake within ${timeoutMs} ms`)),
      timeoutMs,
    );
    socket.on('data', onData);
    socket.on('close', onClose);
    socket.on('error', onError);
    socket.resume();
  });
}

const jsonFrame = (value: unknown) => encodeFrame(Buffer.from(JSON.stringify(value)));

// ---- the worker's side ----------------------------------------------------------------------------------------

/** One frontend connected to a worker. */
export type FrontendConnection = FramedSocket<ToWorker, FromWorker> & { readonly frontend: string };

export interface RequestPlaneServerOptions {
  /** Bind address; default 127.0.0.1. Beyond loopback a token is required. */
  host?: string;
  /** Default 0: a free port. */
  port?: number;
  /** The shared token; default TANDEM_TOKEN. When set, every frontend must prove it holds it. */
  token?: string;
  maxQueuedBytes?: number;
}

/** A worker's listener: frontends connect, prove the token, then exchange protocol messages. */
export class RequestPlaneServer extends EventEmitter<{
  connection: [c: FrontendConnection];
  refused: [reason: string];
}> {
  private readonly connections = new Set<FrontendConnection>();

  private constructor(
    private readonly server: Server,
    readonly host: string,
    readonly port: number,
  ) {
    super();
  }

  /** Listens. Throws BadArgumentError when bound beyond loopback without a token. */
  static async listen(options: RequestPlaneServerOptions = {}): Promise<RequestPlaneServer> {
    const host = options.host ?? '127.0.0.1';
    const token = resolveToken(options.token);
    if (token === undefined && !isLoopbackHost(host))
      throw new BadArgumentError(
        `refusing to serve the request plane on ${host} without a token: set ${TOKEN_ENV} on every worker and frontend`,
      );
    const secret = token === undefined ? undefined : Buffer.from(token, 'utf8');
    let plane: RequestPlaneServer | undefined;
    const server = createServer((socket) => {
      if (plane) void plane.accept(socket, secret, options.maxQueuedBytes);
      else socket.destroy();
    });
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(options.port ?? 0, host, () => {
        server.off('error', reject);
        resolve();
      });
    });
    const address = server.address() as { port: number };
    plane = new RequestPlaneServer(server, host, address.port);
    return plane;
  }

  private async accept(socket: Socket, secret: Buffer | undefined, maxQueuedBytes?: number): Promise<void> {
    socket.on('error', () => {}); // a reset during the handshake; the handshake's read rejects
    const nonce = randomBytes(16);
    socket.write(jsonFrame({ v: PROTOCOL_VERSION, nonce: nonce.toString('hex') }));
    let hello: Record<string, unknown>;
    let rest: Buffer[];
    try {
      ({ value: hello, rest } = await readJsonFrame(socket, HANDSHAKE_TIMEOUT_MS));
    } catch (error) {
      this.emit('refused', (error as Error).message);
      socket.destroy();
      return;
    }
    const refuse = (reason: string) => {
      this.emit('refused', reason);
      socket.end(jsonFrame({ v: PROTOCOL_VERSION, error: reason }));
      setTimeout(() => socket.destroy(), 1000).unref();
    };
    if (typeof hello.frontend !== 'string' || !/^[\w.-]{1,64}$/.test(hello.frontend))
      return refuse('the hello names no frontend');
    if (secret) {
      const proof = typeof hello.proof === 'string' ? Buffer.from(hello.proof, 'hex') : undefined;
      const theirs = typeof hello.nonce === 'string' ? Buffer.from(hello.nonce, 'hex') : Buffer.alloc(0);
      if (!proof || !sameProof(proof, handshakeProof(secret, 'initiator', theirs, nonce)))
        return refuse(`wrong or missing token (${TOKEN_ENV})`);
    }
    socket.write(jsonFrame({ v: PROTOCOL_VERSION, ok: true }));
    const connection = Object.assign(new FramedSocket<ToWorker, FromWorker>(socket, maxQueuedBytes, true), {
      frontend: hello.frontend,
    });
    this.connections.add(connection);
    connection.on('close', () => this.connections.delete(connection));
    connection.start();
    this.emit('connection', connection);
    for (const frame of rest) socket.emit('data', frame);
    socket.resume();
  }

  /** Every frontend connected now. */
  frontends(): FrontendConnection[] {
    return [...this.connections];
  }

  async close(): Promise<void> {
    for (const c of this.connections) c.close();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }
}

// ---- the frontend's side --------------------------------------------------------------------------------------

export interface WorkerClientOptions {
  host: string;
  port: number;
  /** This frontend's id (request ids carry it). */
  frontend: string;
  /** The shared token; default TANDEM_TOKEN. */
  token?: string;
  connectTimeoutMs?: number;
  maxQueuedBytes?: number;
  log?: (line: string) => void;
}

/**
 * A frontend's connection to one worker: connects (bounded by connectTimeoutMs), and after a failure or a
 * break reconnects with exponential backoff until closed. Emits 'up' when a connection is established,
 * 'down' when it breaks (requests in flight on it are lost: the router fails them), 'message' per message.
 * A worker that refuses the token is not retried ('refused').
 */
export class WorkerClient extends EventEmitter<{
  up: [];
  down: [reason: string];
  refused: [reason: string];
  message: [m: FromWorker];
}> {
  private connection?: FramedSocket<FromWorker, ToWorker>;
  private closed = false;
  private failures = 0;
  private retry?: NodeJS.Timeout;
  private readonly secret?: Buffer;

  constructor(private readonly options: WorkerClientOptions) {
    super();
    const token = resolveToken(options.token);
    if (token !== undefined) this.secret = Buffer.from(token, 'utf8');
    this.connect();
  }

  get connected(): boolean {
    return this.connection?.connected ?? false;
  }

  /** False when not connected now, or when the connection's queue is full. */
  send(message: ToWorker): boolean {
    return this.connection?.send(message) ?? false;
  }

  private connect(): void {
    if (this.closed) return;
    const { host, port } = this.options;
    const timeoutMs = this.options.connectTimeoutMs ?? DEFAULT_CONNECT_TIMEOUT_MS;
    const socket = createConnection({ host, port });
    socket.on('error', () => {}); // reported through the handshake's rejection or the FramedSocket
    const timer = setTimeout(
      () => socket.destroy(new Error(`no connection and handshake within ${timeoutMs} ms`)),
      timeoutMs,
    );
    void (async () => {
      try {
        const { value: challenge } = await readJsonFrame(socket, timeoutMs);
        clearTimeout(timer);
        const nonce = randomBytes(16);
        const theirs = Buffer.from(String(challenge.nonce ?? ''), 'hex');
        socket.write(
          jsonFrame({
            v: PROTOCOL_VERSION,
            frontend: this.options.frontend,
            nonce: nonce.toString('hex'),
            ...(this.secret ? { proof: handshakeProof(this.secret, 'initiator', nonce, theirs).toString('hex') } : {}),
          }),
        );
        const { value: answer, rest } = await readJsonFrame(socket, HANDSHAKE_TIMEOUT_MS);
        if (answer.ok !== true) {
          socket.destroy();
          this.closed = true;
          this.emit('refused', String(answer.error ?? 'refused'));
          return;
        }
        if (this.closed) return socket.destroy();
        const connection = new FramedSocket<FromWorker, ToWorker>(socket, this.options.maxQueuedBytes);
        this.connection = connection;
        this.failures = 0;
        connection.on('message', (m) => this.emit('message', m));
        connection.on('close', (error) => {
          if (this.connection === connection) this.connection = undefined;
          this.emit('down', error?.message ?? 'connection closed');
          this.scheduleReconnect();
        });
        connection.start();
        this.emit('up');
        for (const frame of rest) socket.emit('data', frame);
        socket.resume();
      } catch (error) {
        clearTimeout(timer);
        socket.destroy();
        // One line per outage, not one per retry.
        if (this.failures === 0) this.options.log?.(`request plane: ${host}:${port}: ${(error as Error).message}`);
        this.scheduleReconnect();
      }
    })();
  }

  private scheduleReconnect(): void {
    if (this.closed || this.retry) return;
    const delay = Math.min(RECONNECT_MAX_MS, RECONNECT_INITIAL_MS * 2 ** Math.min(this.failures++, 10));
    this.retry = setTimeout(() => {
      this.retry = undefined;
      this.connect();
    }, delay);
    this.retry.unref();
  }

  close(): void {
    this.closed = true;
    clearTimeout(this.retry);
    this.connection?.close();
  }
}

/**
 * The transfer runtime: one agent per process registers memory, exports metadata, loads its peers'
 * metadata, and moves pieces of memory to and from them zero-copy.
 *
 *   const agent = await TransferAgent.create({ name: 'decode-0' });
 *   const pool = agent.allocShared(64 << 20);              // or allocDevice(0, bytes), registerHost(buf)
 *   send(agent.metadata());                                 // any channel: control plane, file, socket
 *   const peer = agent.loadRemote(receivedMetadata);        // the other process's blob
 *   const plan = agent.prepare({ op: 'WRITE', peer: peer.name, local: pool, remote: peer.regions[0],
 *                                pieces: { localOffsets, remoteOffsets, lengths: 65536 } });
 *   await plan.post({ notify: 'block 7 ready' });           // resolves when the data is in place there
 *
 * Backends (plan.backend): `shm` (host memory, one host), `tcp` and `ucx` (host memory, any host),
 * `cuda-ipc` (device memory, one host). See README.md for the rules that pick one.
 */
import { EventEmitter } from 'node:events';
import { BadArgumentError, BadDescriptorError, CanceledError, TimeoutError, native, nativeSync } from '../errors.js';
import {
  loadBinding,
  type CopyStrategy,
  type RawRegion,
  type RawRemotePeer,
  type RawTransferAgent,
  type RawTransferPlan,
} from '../native/binding.js';
import type { DeviceBuffer } from '../cuda/index.js';
import { probeCuda } from '../cuda/index.js';
import { readKernelImage } from '../native/kernels.js';
import { libraryCandidates } from '../native/libraries.js';
import { kvStridedPieces } from '../kv/index.js';
import { checkListen, resolveAllowedUids, resolveSecret, type AuthOptions } from './auth.js';

export { AUTH_ENV, handshakeProof, isLoopbackHost, sameProof, type AuthOptions } from './auth.js';

export type MemoryKind = 'host' | 'shared' | 'pinned' | 'device';
export type BackendName = 'shm' | 'tcp' | 'cuda-ipc' | 'nccl' | 'ucx';
export type { CopyStrategy };

/** A region registered with this agent. */
export interface Region {
  readonly id: number;
  readonly kind: MemoryKind;
  readonly size: number;
  /** CUDA device ordinal for device memory, -1 for host memory. */
  readonly device: number;
  /** Host pointer or device pointer. Opaque: never dereference it in JS. */
  readonly address: bigint;
  /** Shared and pinned host regions: a view of the memory (it stays valid until garbage-collected). */
  readonly view?: Uint8Array;
}

/** A region of a peer, as its metadata described it. */
export interface RemoteRegion {
  readonly id: number;
  readonly kind: MemoryKind;
  readonly size: number;
  readonly device: number;
}

export interface RemotePeer {
  readonly name: string;
  /** Same machine (and PID namespace): shm and cuda-ipc are possible. */
  readonly sameHost: boolean;
  /** Changes when the peer restarts: a restarted peer is a new peer. */
  readonly incarnation: bigint;
  readonly backends: BackendName[];
  readonly regions: readonly RemoteRegion[];
}

/**
 * Pieces of a transfer, as parallel typed arrays (never arrays of objects): piece i moves
 * `lengths[i]` (or `lengths` for all) bytes between local offset `localOffsets[i]` of local region
 * `localRegionIndex[i]` (default 0) and remote offset `remoteOffsets[i]` of remote region
 * `remoteRegionIndex[i]` (default 0). Offsets are integers below 2^53.
 */
export interface PieceList {
  localOffsets: Float64Array;
  remoteOffsets: Float64Array;
  lengths: Float64Array | number;
  localRegionIndex?: Uint32Array;
  remoteRegionIndex?: Uint32Array;
}

/** A strided index list: piece i covers localStart + i*localStride and remoteStart + i*remoteStride. */
export interface StridedPieces {
  localStart: number;
  localStride: number;
  remoteStart: number;
  remoteStride: number;
  count: number;
  length: number;
}

export interface PrepareOptions {
  op: 'READ' | 'WRITE';
  /** The peer's name (as in its metadata). */
  peer: string;
  local: Region | readonly Region[];
  /** Remote regions, or their ids. */
  remote: RemoteRegion | number | readonly (RemoteRegion | number)[];
  pieces: PieceList | { strided: StridedPieces };
  /** Force a backend; by default the best one for this pair is chosen. */
  backend?: BackendName;
}

export interface PostOptions {
  /** Delivered to the peer after this transfer's data is visible there. */
  notify?: Uint8Array | string;
  /** Aborting rejects with CanceledError; pieces not yet started are not moved. */
  signal?: AbortSignal;
}

export interface AgentOptions extends AuthOptions {
  name: string;
  /**
   * Address the agent listens on for peers on other hosts (default 127.0.0.1). Beyond loopback it needs a
   * shared secret (`secret`, TANDEM_TRANSFER_SECRET or TANDEM_TRANSFER_SECRET_FILE) or `trustNetwork`.
   */
  tcpHost?: string;
  /** Port for that listener (default 0: any free port). */
  tcpPort?: number;
  /** How long to wait for a peer's answer or connection before rejecting (default 30000 ms). */
  timeoutMs?: number;
  /**
   * How this agent receives notifications. 'events' (default): each is emitted as a 'notification' event.
   * 'poll': they wait until takeNotifications() takes them, and peers on the same host write them into
   * shared memory that this agent reads, so no thread or event loop is woken to deliver one: the lowest
   * latency, for a process that polls (a decode loop between steps, or a spin while it waits).
   */
  notifications?: 'events' | 'poll';
}

/** A notification taken with TransferAgent.takeNotifications(). */
export interface Notification {
  from: string;
  message: Buffer;
}

const encoder = new TextEncoder();
const asBytes = (m: Uint8Array | string): Uint8Array => (typeof m === 'string' ? encoder.encode(m) : m);
/** What a post done during the call returns (settled already; shared, as it carries no value). */
const DONE: Promise<void> = Promise.resolve();

/** A prepared transfer: validated once, posted many times. */
export class TransferPlan {
  /** @internal */
  constructor(
    private readonly agent: TransferAgent,
    /** @internal */ readonly raw: RawTransferPlan,
  ) {}

  /** The backend that moves this transfer's bytes. */
  get backend(): BackendName {
    return this.raw.backend as BackendName;
  }
  get op(): 'READ' | 'WRITE' {
    return this.raw.op;
  }
  get peer(): string {
    return this.raw.peer;
  }
  /** Pieces after adjacent ones were merged. */
  get pieces(): number {
    return this.raw.pieces;
  }
  /** Pieces as given to prepare(). */
  get requestedPieces(): number {
    return this.raw.requestedPieces;
  }
  get bytes(): number {
    return this.raw.bytes;
  }
  /**
   * cuda-ipc only (undefined otherwise): how the copies are issued. 'undecided' until the first posts have
   * timed each applicable way: 'kernel' (a copy kernel on the SMs, for many small pieces), 'copy-engine'
   * (one copy per piece, for few), 'batch' (batched copy-engine copies, for device-to-device pieces of
   * 256 KiB and up on drivers 12.8+). TANDEM_CUDA_COPY=kernel|engine|batch forces one where it can run.
   */
  get copyStrategy(): CopyStrategy | undefined {
    return this.raw.copyStrategy;
  }

  /** Moves the data; resolves when it is in place at the target (WRITE) or here (READ). */
  post(options: PostOptions = {}): Promise<void> {
    return this.agent.postPlan(this, options);
  }
}

/**
 * One per process: registers memory, talks to peers, moves pieces. Emits 'notification' (from, message),
 * or, created with `notifications: 'poll'`, keeps them for takeNotifications().
 */
export class TransferAgent extends EventEmitter<{ notification: [from: string, message: Buffer] }> {
  private readonly raw: RawTransferAgent;
  private readonly regions = new Map<number, Region>();
  /** Whether notifications are taken with takeNotifications() (options.notifications 'poll'). */
  readonly pollsNotifications: boolean;

  private constructor(raw: RawTransferAgent, onNotification: { target?: TransferAgent }, polls: boolean) {
    super();
    this.raw = raw;
    this.pollsNotifications = polls;
    onNotification.target = this;
  }

  /** Creates the agent; it listens for peers at once and keeps the process alive until dispose(). */
  static async create(options: AgentOptions): Promise<TransferAgent> {
    if (!options || typeof options.name !== 'string' || options.name.length === 0) {
      throw new BadArgumentError('TransferAgent.create needs a non-empty name');
    }
    if (options.notifications !== undefined && options.notifications !== 'events' && options.notifications !== 'poll') {
      throw new BadArgumentError(`notifications must be 'events' or 'poll', not ${String(options.notifications)}`);
    }
    const secret = resolveSecret(options);
    const allowedUids = resolveAllowedUids(options);
    checkListen(options.tcpHost ?? '127.0.0.1', secret, options);
    // Load the CUDA driver first (if any) so that the agent can offer cuda-ipc.
    await probeCuda();
    const { binding } = loadBinding();
    const holder: { target?: TransferAgent } = {};
    const kernels = readKernelImage();
    const raw = nativeSync(
      () =>
        new binding.TransferAgent(
          {
            name: options.name,
            ...(options.tcpHost !== undefined ? { tcpHost: options.tcpHost } : {}),
            ...(options.tcpPort !== undefined ? { tcpPort: options.tcpPort } : {}),
            ...(options.timeoutMs !== undefined ? { timeoutMs: options.timeoutMs } : {}),
            ...(options.notifications !== undefined ? { notifications: options.notifications } : {}),
            ...(kernels ? { kernels } : {}),
            ...(secret ? { secret } : {}),
            allowedUids,
            ucp: libraryCandidates().ucp,
            nccl: libraryCandidates().nccl,
          },
          (from, message) => {
            const agent = holder.target;
            if (!agent) return;
            try {
              agent.emit('notification', from, message);
            } catch (error) {
              // A throwing listener must not unwind into native code; surface it like any async error.
              queueMicrotask(() => {
                throw error;
              });
            }
          },
        ),
    );
    return new TransferAgent(raw, holder, options.notifications === 'poll');
  }

  get name(): string {
    return this.raw.name;
  }
  /** Random per process start; peers use it to tell a restarted agent from the old one. */
  get incarnation(): bigint {
    return this.raw.incarnation;
  }
  get tcpPort(): number {
    return this.raw.tcpPort;
  }
  /** Backends this agent can drive here. */
  get backends(): BackendName[] {
    return this.raw.backends as BackendName[];
  }
  get disposed(): boolean {
    return this.raw.disposed;
  }
  /** Why the ucx backend is not offered ('' when it is). */
  get ucxUnavailableReason(): string {
    return this.raw.ucxReason;
  }
  /** Why the nccl backend is not offered ('' when it is). */
  get ncclUnavailableReason(): string {
    return this.raw.ncclReason;
  }
  /**
   * How many cuda-ipc posts this process's calling thread issued to the GPU itself, without the agent's
   * thread: posts of a plan whose copy strategy is settled (the kernel, one launch; or the copy engines,
   * at most 8 pieces), with nothing of the same peer queued ahead. The agent's thread still watches their
   * completion (and sends their notifications, unless the stream commits them: see streamCommits).
   */
  get directPosts(): number {
    return this.raw.directPosts;
  }
  /**
   * How many cuda-ipc notifications this agent had committed by the GPU stream itself, right after the
   * copy, to a target that polls its notifications (`notifications: 'poll'`): no host thread stands
   * between the data landing and the target seeing the notification.
   */
  get streamCommits(): number {
    return this.raw.streamCommits;
  }

  private remember(raw: RawRegion): Region {
    const region: Region = {
      id: raw.id,
      kind: raw.kind,
      size: raw.size,
      device: raw.device,
      address: raw.address,
      ...(raw.buffer ? { view: new Uint8Array(raw.buffer) } : {}),
    };
    this.regions.set(region.id, region);
    return region;
  }

  /** Allocates host memory that peers on this host can map (the shm backend writes straight into it). */
  allocShared(bytes: number): Region {
    return this.remember(nativeSync(() => this.raw.allocShared(bytes, false)));
  }
  /** Shared host memory that is also page-locked for the GPU (needs CUDA). */
  allocPinned(bytes: number): Region {
    return this.remember(nativeSync(() => this.raw.allocShared(bytes, true)));
  }
  /** Registers memory the caller owns (kept alive until deregistered). Peers reach it over tcp. */
  registerHost(buffer: ArrayBufferView): Region {
    return this.remember(nativeSync(() => this.raw.registerHost(buffer)));
  }
  /** Registers device memory: a DeviceBuffer, or an external pointer that an engine owns. */
  registerDevice(memory: DeviceBuffer | { device: number; address: bigint; bytes: number }): Region {
    const spec =
      'bytes' in memory
        ? memory
        : { device: (memory as DeviceBuffer).device.ordinal, address: memory.address, bytes: memory.size };
    return this.remember(nativeSync(() => this.raw.registerDevice(spec.device, spec.address, spec.bytes)));
  }
  /** Allocates device memory owned by the agent (freed on deregister or dispose). */
  allocDevice(device: number, bytes: number): Region {
    return this.remember(nativeSync(() => this.raw.allocDevice(device, bytes)));
  }
  deregister(region: Region | number): void {
    const id = typeof region === 'number' ? region : region.id;
    nativeSync(() => this.raw.deregister(id));
    this.regions.delete(id);
  }
  /** Regions registered now. */
  registered(): Region[] {
    return [...this.regions.values()];
  }

  /** This agent's metadata blob: hand it to peers through any channel. Re-export after registering more. */
  metadata(): Uint8Array {
    return nativeSync(() => this.raw.metadata());
  }

  /**
   * Loads a peer's metadata. A malformed, truncated or incompatible blob throws MetadataError and
   * changes nothing. Loading a restarted peer (same name, new incarnation) replaces the old one, whose
   * pending transfers reject with RemoteDisconnectError. Loading the same peer again makes its regions
   * exactly those of the blob (an older blob than the one loaded changes nothing); plans and prepare()
   * naming a region it no longer has reject with RemoteRegionGoneError, as do posts to a region the
   * peer deregistered before its new metadata was loaded.
   */
  loadRemote(metadata: Uint8Array): RemotePeer {
    const raw: RawRemotePeer = nativeSync(() => this.raw.loadRemote(metadata));
    return { ...raw, backends: raw.backends as BackendName[] };
  }

  /** Forgets a peer; its pending transfers reject with RemoteDisconnectError. */
  removeRemote(name: string): boolean {
    return nativeSync(() => this.raw.removeRemote(name));
  }

  /** Validates every piece against its regions and builds a plan; throws before anything moves. */
  prepare(options: PrepareOptions): TransferPlan {
    const locals = Array.isArray(options.local) ? (options.local as readonly Region[]) : [options.local as Region];
    const remotesIn = Array.isArray(options.remote) ? options.remote : [options.remote];
    const localIds = Uint32Array.from(locals, (r) => r.id);
    const remoteIds = Uint32Array.from(remotesIn as readonly (RemoteRegion | number)[], (r) =>
      typeof r === 'number' ? r : r.id,
    );
    const pieces: PieceList = 'strided' in options.pieces ? kvStridedPieces(options.pieces.strided) : options.pieces;
    if (!(pieces.localOffsets instanceof Float64Array) || !(pieces.remoteOffsets instanceof Float64Array)) {
      throw new BadDescriptorError('localOffsets and remoteOffsets must be Float64Arrays');
    }
    if (pieces.localOffsets.length !== pieces.remoteOffsets.length) {
      throw new BadDescriptorError(
        `localOffsets has ${pieces.localOffsets.length} pieces but remoteOffsets has ${pieces.remoteOffsets.length}`,
      );
    }
    const raw = nativeSync(() =>
      this.raw.prepare(
        options.op,
        options.peer,
        localIds,
        remoteIds,
        pieces.localOffsets,
        pieces.remoteOffsets,
        pieces.lengths,
        pieces.localRegionIndex,
        pieces.remoteRegionIndex,
        options.backend,
      ),
    );
    return new TransferPlan(this, raw);
  }

  /** @internal */
  postPlan(plan: TransferPlan, options: PostOptions): Promise<void> {
    const signal = options.signal;
    if (signal?.aborted)
      return Promise.reject(new CanceledError('the transfer was canceled before it was posted; nothing was moved'));
    let posted: ReturnType<RawTransferPlan['post']>;
    try {
      posted = nativeSync(() => plan.raw.post(options.notify === undefined ? undefined : asBytes(options.notify)));
    } catch (e) {
      return Promise.reject(e); // as every other failure of a post: through the promise (DisposedError, ...)
    }
    if (!posted) return DONE;
    const { token, promise } = posted;
    if (!signal) return native(() => promise);
    const onAbort = () => this.raw.cancel(token);
    signal.addEventListener('abort', onAbort, { once: true });
    return native(() => promise).finally(() => signal.removeEventListener('abort', onAbort));
  }

  /** Sends a plain notification (no data) to a peer. */
  notify(peer: string, message: Uint8Array | string): Promise<void> {
    const bytes = asBytes(message);
    const sent = nativeSync(() => this.raw.notify(peer, bytes));
    return sent ? native(() => sent) : DONE;
  }

  /**
   * Takes the notifications that have arrived (at most `max`), oldest first; each sender's in the order
   * it sent them, each after the data it follows. Never waits: [] when there are none. Only for an agent
   * created with `notifications: 'poll'` (BadArgumentError otherwise).
   */
  takeNotifications(max?: number): Notification[] {
    return nativeSync(() => this.raw.takeNotifications(max));
  }

  /**
   * Pays now what the first cuda-ipc transfer with `peer` would otherwise pay (tens of milliseconds:
   * opening the peer's GPU memory through CUDA IPC, loading the copy kernel, the connection). Call it
   * after loadRemote, off the latency path. Resolves at once where there is nothing to warm (no GPU,
   * a peer on another host, no device regions). Resolves with how many of the peer's GPU regions are
   * open. Rejects with UnknownPeerError for a peer not loaded.
   */
  async warmup(peer: string): Promise<{ deviceRegions: number }> {
    const opened = await native(() => this.raw.warmup(peer));
    return { deviceRegions: Number(opened) };
  }

  /** Resolves with the next notification from `from` (any peer if omitted) that `match` accepts. */
  waitForNotification(
    options: { from?: string; match?: (message: Buffer) => boolean; timeoutMs?: number; signal?: AbortSignal } = {},
  ): Promise<{ from: string; message: Buffer }> {
    if (this.pollsNotifications) {
      return Promise.reject(
        new BadArgumentError("this agent's notifications are taken with takeNotifications() (notifications: 'poll')"),
      );
    }
    return new Promise((resolve, reject) => {
      const cleanup = () => {
        this.off('notification', listener);
        if (timer) clearTimeout(timer);
        options.signal?.removeEventListener('abort', onAbort);
      };
      const listener = (from: string, message: Buffer) => {
        if (options.from !== undefined && from !== options.from) return;
        if (options.match && !options.match(message)) return;
        cleanup();
        resolve({ from, message });
      };
      const onAbort = () => {
        cleanup();
        reject(new CanceledError('waiting for a notification was canceled'));
      };
      const timer =
        options.timeoutMs === undefined
          ? undefined
          : setTimeout(() => {
              cleanup();
              reject(
                new TimeoutError(
                  `no notification${options.from ? ` from '${options.from}'` : ''} within ${options.timeoutMs} ms`,
                ),
              );
            }, options.timeoutMs);
      if (options.signal?.aborted) return onAbort();
      options.signal?.addEventListener('abort', onAbort, { once: true });
      this.on('notification', listener);
    });
  }

  /** Rejects pending transfers, closes connections, joins the agent's threads, frees its memory. */
  async dispose(): Promise<void> {
    await this.raw.dispose();
    this.regions.clear();
  }
  [Symbol.asyncDispose](): Promise<void> {
    return this.dispose();
  }
}

/**
 * NCCL collectives for TypeScript workers: communicators across processes and hosts (or one per GPU in
 * one process), and all-reduce, all-gather, reduce-scatter, broadcast, reduce, send/recv and all-to-all
 * on device memory.
 *
 * Every operation is enqueued, in call order, on a stream the communicator owns, and returns a Promise
 * that settles when the operation has completed on the GPU; issue several and await the last (or all)
 * to keep the GPU busy. Each operation has a timeout: when it expires, or NCCL reports an asynchronous
 * error, the communicator is aborted and every pending Promise rejects with a CollectiveError subclass
 * naming the communicator and the operation. Without NCCL or a GPU every call rejects with
 * NcclUnavailableError ("NCCL unavailable: <reason>"). See docs/collectives.md.
 */
import { probeCuda } from '../cuda/index.js';
import {
  BadArgumentError,
  DisposedError,
  NcclUnavailableError,
  OutOfBoundsError,
  native,
  nativeSync,
} from '../errors.js';
import { libraryCandidates } from '../native/libraries.js';
import {
  type AllToAllArgs,
  type BroadcastArgs,
  type CommShape,
  type DeviceMemory,
  type GatherArgs,
  type OpWords,
  type PointToPointArgs,
  type ReduceArgs,
  type ReduceScatterArgs,
  type RootedReduceArgs,
  checkTimeout,
  encodeOps,
  planAllGather,
  planAllReduce,
  planAllToAll,
  planBroadcast,
  planPointToPoint,
  planReduce,
  planReduceScatter,
} from './ops.js';
import { collectivesBinding, type RawNcclComm, type RawNcclStatus } from './raw.js';

export {
  DTYPES,
  REDUCE_OPS,
  busBandwidthFactor,
  type AllToAllArgs,
  type BroadcastArgs,
  type DeviceMemory,
  type Dtype,
  type GatherArgs,
  type PointToPointArgs,
  type ReduceArgs,
  type ReduceOp,
  type ReduceScatterArgs,
  type RootedReduceArgs,
} from './ops.js';

/** Default timeout of init, split and every operation, unless the caller gives one. */
export const DEFAULT_COLLECTIVE_TIMEOUT_MS = 60_000;
/** Bytes of an NCCL unique id (NCCL_UNIQUE_ID_BYTES). */
export const UNIQUE_ID_BYTES = 128;

export interface NcclInfo {
  available: boolean;
  reason?: string;
  libraryPath?: string;
  /** "2.28.3" */
  version?: string;
  versionCode?: number;
  /** The fp8 element types are usable (NCCL 2.24 and newer). */
  fp8: boolean;
}

let statusPromise: Promise<RawNcclStatus> | undefined;

function ncclStatus(): Promise<RawNcclStatus> {
  statusPromise ??= native(() => collectivesBinding().ncclLoad(libraryCandidates().nccl));
  return statusPromise;
}

/** Loads NCCL (once per process; TANDEM_LIBNCCL and the usual folders) and says whether it is usable. */
export async function ncclInfo(): Promise<NcclInfo> {
  const s = await ncclStatus();
  return {
    available: s.available,
    ...(s.reason ? { reason: s.reason } : {}),
    ...(s.libraryPath ? { libraryPath: s.libraryPath } : {}),
    ...(s.version ? { version: s.version, versionCode: s.versionCode } : {}),
    fp8: s.fp8,
  };
}

async function requireNccl(needGpu: boolean): Promise<{ status: RawNcclStatus; deviceCount: number }> {
  const status = await ncclStatus();
  if (!status.available) throw new NcclUnavailableError(status.reason ?? 'unknown reason');
  if (!needGpu) return { status, deviceCount: 0 };
  const cuda = await probeCuda();
  if (!cuda.available)
    throw new NcclUnavailableError(`no usable GPU (CUDA unavailable: ${cuda.reason ?? 'unknown reason'})`);
  return { status, deviceCount: cuda.deviceCount };
}

/**
 * A new NCCL unique id: 128 bytes to hand to every rank (through any channel) for Communicator.init.
 * Needs NCCL but not a GPU. NCCL's bootstrap root runs in this process, which must stay alive until
 * every rank has joined.
 */
export async function createUniqueId(): Promise<Uint8Array> {
  await requireNccl(false);
  const bytes = await native(() => collectivesBinding().ncclUniqueId());
  return new Uint8Array(bytes);
}

export interface CommunicatorOptions {
  /** The id from createUniqueId(), the same on every rank. */
  id: Uint8Array;
  rank: number;
  /** Number of ranks. */
  size: number;
  /** CUDA device ordinal this rank runs on. */
  device: number;
  /** Names the communicator in errors and NCCL's logs. Default 'nccl'. */
  name?: string;
  /** Init's timeout, and the default of every operation. Default DEFAULT_COLLECTIVE_TIMEOUT_MS. */
  timeoutMs?: number;
}

function checkName(name: unknown): string {
  if (typeof name !== 'string' || name.length === 0 || name.length > 200) {
    throw new BadArgumentError(`communicator name must be a string of 1..200 characters, got ${JSON.stringify(name)}`);
  }
  return name;
}

function checkDevice(device: unknown): number {
  if (typeof device !== 'number' || !Number.isInteger(device) || device < 0) {
    throw new BadArgumentError(`device must be a non-negative integer CUDA ordinal, got ${String(device)}`);
  }
  return device;
}

/** Device memory allocated by a communicator on its GPU; copies and fills are ordered with its operations. */
export class CollectiveBuffer implements DeviceMemory {
  #disposed = false;

  /** @internal */
  constructor(
    private readonly comm: Communicator,
    /** @internal */ private readonly raw: RawNcclComm,
    readonly address: bigint,
    readonly bytes: number,
  ) {}

  get device(): number {
    return this.comm.device;
  }
  get disposed(): boolean {
    return this.#disposed || this.comm.disposed;
  }

  /** A sub-range, for operations on part of the buffer. */
  view(offset: number, bytes: number): DeviceMemory {
    this.checkRange('view', offset, bytes);
    return { device: this.comm.device, address: this.address + BigInt(offset), bytes };
  }

  /** Copies `source` into the buffer at byte `offset`, after the operations submitted before it. */
  copyFromHost(source: ArrayBufferView, offset = 0, timeoutMs = this.comm.timeoutMs): Promise<void> {
    return this.transfer('copyFromHost', source, offset, timeoutMs);
  }

  /** Copies `target.byteLength` bytes from byte `offset` into `target`, after the operations submitted before it. */
  copyToHost(target: ArrayBufferView, offset = 0, timeoutMs = this.comm.timeoutMs): Promise<void> {
    return this.transfer('copyToHost', target, offset, timeoutMs);
  }

  /** Sets every byte to `byte`, in order with the communicator's operations. */
  async fill(byte: number, timeoutMs = this.comm.timeoutMs): Promise<void> {
    if (this.disposed) throw new DisposedError(`a buffer of communicator '${this.comm.name}' was disposed`);
    if (!Number.isInteger(byte) || byte < 0 || byte > 255)
      throw new BadArgumentError(`fill value must be a byte (0..255), got ${byte}`);
    await native(() => this.raw.memset(this.address, byte, this.bytes, checkTimeout(timeoutMs)));
  }

  /** Frees the memory (after operations using it have settled). Twice is harmless. */
  async dispose(): Promise<void> {
    if (this.#disposed) return;
    this.#disposed = true;
    if (this.comm.disposed) return; // freed with the communicator
    await native(() => this.raw.free(this.address));
  }
  [Symbol.asyncDispose](): Promise<void> {
    return this.dispose();
  }

  private checkRange(what: string, offset: number, bytes: number): void {
    if (!Number.isSafeInteger(offset) || offset < 0 || !Number.isSafeInteger(bytes) || bytes < 0) {
      throw new BadArgumentError(`${what}: offset and length must be non-negative integers`);
    }
    if (offset + bytes > this.bytes) {
      throw new OutOfBoundsError(
        `${what} of ${bytes} bytes at offset ${offset} runs past the end of a ${this.bytes}-byte buffer of communicator '${this.comm.name}'`,
      );
    }
  }

  private async transfer(
    what: 'copyFromHost' | 'copyToHost',
    view: ArrayBufferView,
    offset: number,
    timeoutMs: number,
  ): Promise<void> {
    if (this.disposed) throw new DisposedError(`a buffer of communicator '${this.comm.name}' was disposed`);
    if (!ArrayBuffer.isView(view)) throw new BadArgumentError(`${what} expects a typed array or DataView`);
    this.checkRange(what, offset, view.byteLength);
    checkTimeout(timeoutMs);
    if (view.byteLength === 0) return;
    const address = this.address + BigInt(offset);
    await native(() =>
      what === 'copyFromHost'
        ? this.raw.copyToDevice(address, view, timeoutMs)
        : this.raw.copyToHost(address, view, timeoutMs),
    );
  }
}

interface OpenGroup {
  ops: OpWords[];
  /** An operation of the group failed validation: the group is not submitted and rejects with this. */
  error?: unknown;
  labels: Set<string>;
  timeoutMs: number;
  promise: Promise<void>;
  resolve: () => void;
  reject: (error: unknown) => void;
}

/** One rank of an NCCL communicator, bound to one GPU. */
export class Communicator {
  private groupDepth = 0;
  private openGroup: OpenGroup | undefined;
  private readonly shape: CommShape;

  private constructor(
    private readonly raw: RawNcclComm,
    status: RawNcclStatus,
    /** Default timeout of this communicator's operations, in milliseconds. */
    readonly timeoutMs: number,
  ) {
    this.shape = {
      name: raw.name,
      rank: raw.rank,
      size: raw.size,
      device: raw.device,
      fp8: status.fp8,
      ...(status.version ? { ncclVersion: status.version } : {}),
    };
  }

  /**
   * Joins communicator `id` as `rank` of `size`, on GPU `device`. Resolves once every rank has joined;
   * rejects with CollectiveTimeoutError if they have not within `timeoutMs` (the communicator is then
   * aborted), and with NcclUnavailableError where NCCL or a GPU is missing.
   */
  static async init(options: CommunicatorOptions): Promise<Communicator> {
    if (!options || typeof options !== 'object')
      throw new BadArgumentError('Communicator.init expects an options object');
    const name = checkName(options.name ?? 'nccl');
    const { size, rank } = options;
    if (typeof size !== 'number' || !Number.isInteger(size) || size < 1) {
      throw new BadArgumentError(`communicator '${name}': size must be a positive integer, got ${String(size)}`);
    }
    if (typeof rank !== 'number' || !Number.isInteger(rank) || rank < 0 || rank >= size) {
      throw new BadArgumentError(
        `communicator '${name}': rank ${String(rank)} is out of range (ranks are 0..${size - 1})`,
      );
    }
    const device = checkDevice(options.device);
    if (!(options.id instanceof Uint8Array) || options.id.byteLength !== UNIQUE_ID_BYTES) {
      throw new BadArgumentError(
        `communicator '${name}': id must be the ${UNIQUE_ID_BYTES} bytes that createUniqueId() returned`,
      );
    }
    const timeoutMs = checkTimeout(options.timeoutMs ?? DEFAULT_COLLECTIVE_TIMEOUT_MS);
    const { status, deviceCount } = await requireNccl(true);
    if (device >= deviceCount) throw new BadArgumentError(`no CUDA device ${device} (this machine has ${deviceCount})`);
    const binding = collectivesBinding();
    const raw = nativeSync(() => binding.ncclInit({ name, device, rank, size, id: options.id, timeoutMs }));
    const comm = await Communicator.opened(raw, status, timeoutMs);
    if (!comm) throw new Error(`communicator '${name}': init returned no communicator`);
    return comm;
  }

  /**
   * One communicator per GPU in this process (rank i on devices[i]), made together as ncclCommInitAll
   * does: what an engine that drives several GPUs from one process needs. Each communicator has its own
   * thread and stream, so their operations run concurrently.
   */
  static async initAll(options: { devices: number[]; name?: string; timeoutMs?: number }): Promise<Communicator[]> {
    if (!options || !Array.isArray(options.devices) || options.devices.length === 0) {
      throw new BadArgumentError('Communicator.initAll expects { devices: [ordinal, ...] } with at least one device');
    }
    const name = checkName(options.name ?? 'nccl');
    const devices = options.devices.map(checkDevice);
    if (new Set(devices).size !== devices.length)
      throw new BadArgumentError(`devices must be distinct, got ${devices.join(', ')}`);
    const timeoutMs = checkTimeout(options.timeoutMs ?? DEFAULT_COLLECTIVE_TIMEOUT_MS);
    const { status, deviceCount } = await requireNccl(true);
    for (const d of devices)
      if (d >= deviceCount) throw new BadArgumentError(`no CUDA device ${d} (this machine has ${deviceCount})`);
    const binding = collectivesBinding();
    const raws = nativeSync(() =>
      binding.ncclInitAll({ names: devices.map((_, i) => `${name}/${i}`), devices, timeoutMs }),
    );
    const results = await Promise.allSettled(raws.map((raw) => native(() => raw.ready())));
    const failed = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
    if (failed) {
      await Promise.all(raws.map((raw) => raw.dispose()));
      throw failed.reason;
    }
    return raws.map((raw) => new Communicator(raw, status, timeoutMs));
  }

  private static async opened(
    raw: RawNcclComm,
    status: RawNcclStatus,
    timeoutMs: number,
  ): Promise<Communicator | null> {
    let member: boolean;
    try {
      member = await native(() => raw.ready());
    } catch (error) {
      await raw.dispose();
      throw error;
    }
    if (!member) {
      await raw.dispose();
      return null;
    }
    return new Communicator(raw, status, timeoutMs);
  }

  get name(): string {
    return this.shape.name;
  }
  get rank(): number {
    return this.shape.rank;
  }
  get size(): number {
    return this.shape.size;
  }
  get device(): number {
    return this.shape.device;
  }
  /** True once a timeout, an NCCL error or abort() has aborted the communicator. */
  get aborted(): boolean {
    return this.raw.aborted;
  }
  get abortReason(): string | undefined {
    return this.raw.abortReason;
  }
  get disposed(): boolean {
    return this.raw.disposed;
  }

  /**
   * Splits the communicator, as ncclCommSplit: every rank calls it, in the same order relative to its
   * other calls; ranks with the same `color` form a new communicator, ordered by `key` (then by rank).
   * `color` null leaves this rank out (resolves null).
   */
  async split(
    color: number | null,
    key: number = this.rank,
    options: { name?: string; timeoutMs?: number } = {},
  ): Promise<Communicator | null> {
    if (color !== null && (!Number.isInteger(color) || color < 0 || color > 2 ** 31 - 1)) {
      throw new BadArgumentError(`split: color must be a non-negative 32-bit integer or null, got ${String(color)}`);
    }
    if (!Number.isInteger(key) || key < -(2 ** 31) || key > 2 ** 31 - 1) {
      throw new BadArgumentError(`split: key must be a 32-bit integer, got ${String(key)}`);
    }
    const name = checkName(options.name ?? `${this.name}.${color ?? 'none'}`);
    const timeoutMs = checkTimeout(options.timeoutMs ?? this.timeoutMs);
    const status = await ncclStatus();
    const raw = nativeSync(() => this.raw.split(color ?? -1, key, name, timeoutMs));
    return Communicator.opened(raw, status, timeoutMs);
  }

  /** Device memory on this communicator's GPU, freed by its dispose() or the communicator's. */
  async alloc(bytes: number): Promise<CollectiveBuffer> {
    if (!Number.isSafeInteger(bytes) || bytes < 1)
      throw new BadArgumentError(`alloc: bytes must be a positive integer, got ${bytes}`);
    const address = await native(() => this.raw.alloc(bytes));
    return new CollectiveBuffer(this, this.raw, address, bytes);
  }

  allReduce(args: ReduceArgs): Promise<void> {
    return this.run(() => [planAllReduce(this.shape, args)], args.timeoutMs);
  }
  allGather(args: GatherArgs): Promise<void> {
    return this.run(() => [planAllGather(this.shape, args)], args.timeoutMs);
  }
  reduceScatter(args: ReduceScatterArgs): Promise<void> {
    return this.run(() => [planReduceScatter(this.shape, args)], args.timeoutMs);
  }
  broadcast(args: BroadcastArgs): Promise<void> {
    return this.run(() => [planBroadcast(this.shape, args)], args.timeoutMs);
  }
  reduce(args: RootedReduceArgs): Promise<void> {
    return this.run(() => [planReduce(this.shape, args)], args.timeoutMs);
  }
  /** Sends to `peer`, which must recv the same count and dtype. Group it with the matching recv when both ranks send. */
  send(args: PointToPointArgs): Promise<void> {
    return this.run(() => [planPointToPoint(this.shape, 'send', args)], args.timeoutMs);
  }
  recv(args: PointToPointArgs): Promise<void> {
    return this.run(() => [planPointToPoint(this.shape, 'recv', args)], args.timeoutMs);
  }
  /** Block p (`count` elements) of send goes to rank p; block p of recv comes from rank p. Grouped send/recv. */
  allToAll(args: AllToAllArgs): Promise<void> {
    return this.run(() => planAllToAll(this.shape, args), args.timeoutMs, 'allToAll');
  }

  /**
   * Opens a group (ncclGroupStart): operations called until the matching groupEnd() are launched
   * together and settle together. Groups nest.
   */
  groupStart(): void {
    if (this.groupDepth++ > 0) return;
    let resolve!: () => void;
    let reject!: (error: unknown) => void;
    const promise = new Promise<void>((res, rej) => {
      resolve = res;
      reject = rej;
    });
    this.openGroup = { ops: [], labels: new Set(), timeoutMs: 0, promise, resolve, reject };
  }

  /** Closes a group (ncclGroupEnd); the outermost one submits it. Resolves when every operation in it has completed. */
  groupEnd(options: { timeoutMs?: number } = {}): Promise<void> {
    if (this.groupDepth === 0)
      return Promise.reject(new BadArgumentError(`communicator '${this.name}': groupEnd without groupStart`));
    const group = this.openGroup!;
    if (options.timeoutMs !== undefined) {
      try {
        group.timeoutMs = Math.max(group.timeoutMs, checkTimeout(options.timeoutMs));
      } catch (error) {
        group.error ??= error;
      }
    }
    if (--this.groupDepth > 0) return group.promise;
    this.openGroup = undefined;
    if (group.error !== undefined) {
      group.reject(group.error);
      return group.promise;
    }
    if (group.ops.length === 0) {
      group.resolve();
      return group.promise;
    }
    const label = group.labels.size === 1 ? [...group.labels][0]! : 'group';
    this.submit(group.ops, group.timeoutMs || this.timeoutMs, label).then(group.resolve, group.reject);
    return group.promise;
  }

  /** Runs `body` between groupStart() and groupEnd(); resolves when the group has completed. */
  group(body: () => void, options: { timeoutMs?: number } = {}): Promise<void> {
    this.groupStart();
    try {
      body();
    } catch (error) {
      this.openGroup!.error ??= error;
    }
    return this.groupEnd(options);
  }

  /** Aborts now: every pending operation rejects, and later calls reject with CommunicatorAbortedError. */
  abort(reason?: string): Promise<void> {
    return native(() => this.raw.abort(reason));
  }

  /**
   * Waits for what was submitted (each operation bounded by its timeout), destroys the communicator,
   * frees the buffers it allocated and joins its threads.
   */
  dispose(): Promise<void> {
    return native(() => this.raw.dispose());
  }
  [Symbol.asyncDispose](): Promise<void> {
    return this.dispose();
  }

  private run(plan: () => OpWords[], timeoutMs: number | undefined, label?: string): Promise<void> {
    let ops: OpWords[];
    let timeout: number;
    const group = this.openGroup;
    try {
      if (this.raw.disposed) throw new DisposedError(`communicator '${this.name}' was disposed`);
      ops = plan();
      timeout = timeoutMs === undefined ? this.timeoutMs : checkTimeout(timeoutMs);
    } catch (error) {
      if (group) {
        // A group with a bad operation must not run without it (the peers would wait for it): the whole
        // group rejects, and so does this operation's Promise, which is the group's.
        group.error ??= error;
        return group.promise;
      }
      return Promise.reject(error);
    }
    if (group) {
      group.ops.push(...ops);
      group.labels.add(label ?? 'group');
      if (timeoutMs !== undefined) group.timeoutMs = Math.max(group.timeoutMs, timeout);
      return group.promise;
    }
    return this.submit(ops, timeout, label);
  }

  private submit(ops: OpWords[], timeoutMs: number, label: string | undefined): Promise<void> {
    const descriptor = encodeOps(ops);
    return native(() => this.raw.submit(descriptor, timeoutMs, label));
  }
}

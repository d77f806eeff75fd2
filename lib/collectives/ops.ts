/**
 * Collective operations as descriptors: element types, reductions, and the checks that turn a call such
 * as `allReduce({ send, recv, dtype: 'bfloat16' })` into the words the native layer enqueues. Pure
 * functions of the communicator's shape, so every rule here is tested without a GPU
 * (test/08.collectives.validation.test.ts).
 */
import { BadArgumentError, DisposedError } from '../errors.js';

/** Element types, with NCCL's ncclDataType_t code and size. fp8 needs NCCL 2.24 or newer. */
export const DTYPES = {
  int8: { code: 0, bytes: 1 },
  uint8: { code: 1, bytes: 1 },
  int32: { code: 2, bytes: 4 },
  uint32: { code: 3, bytes: 4 },
  int64: { code: 4, bytes: 8 },
  uint64: { code: 5, bytes: 8 },
  float16: { code: 6, bytes: 2 },
  float32: { code: 7, bytes: 4 },
  float64: { code: 8, bytes: 8 },
  bfloat16: { code: 9, bytes: 2 },
  float8e4m3: { code: 10, bytes: 1 },
  float8e5m2: { code: 11, bytes: 1 },
} as const;
export type Dtype = keyof typeof DTYPES;

/** Reductions, with NCCL's ncclRedOp_t code. `avg` divides the sum by the number of ranks (integers truncate). */
export const REDUCE_OPS = { sum: 0, prod: 1, max: 2, min: 3, avg: 4 } as const;
export type ReduceOp = keyof typeof REDUCE_OPS;

/** Operation kinds; the same numbers as OpKind in native/src/nccl/communicator.h. */
export const OP_KIND = {
  allReduce: 0,
  allGather: 1,
  reduceScatter: 2,
  broadcast: 3,
  reduce: 4,
  send: 5,
  recv: 6,
} as const;
export type OpName = keyof typeof OP_KIND;

/** Words per operation in a descriptor: kind, send, recv, count, dtype, redop, peer. */
export const DESCRIPTOR_WORDS = 7;

/**
 * Device memory an operation reads or writes: a `DeviceBuffer` (lib/cuda), a device region registered
 * with the transfer runtime, a `CollectiveBuffer` (Communicator.alloc), or a raw
 * `{ device, address, bytes }` for memory the caller vouches for.
 */
export interface DeviceMemory {
  readonly address: bigint;
  /** CUDA device ordinal, or an object that has one (a DeviceBuffer's `device`). */
  readonly device: number | { readonly ordinal: number };
  /** Length in bytes: `bytes`, or `size` as DeviceBuffer and transfer regions call it. */
  readonly bytes?: number;
  readonly size?: number;
  readonly disposed?: boolean;
}

/** What validation needs to know about a communicator. */
export interface CommShape {
  name: string;
  rank: number;
  size: number;
  device: number;
  /** The loaded NCCL has the fp8 types. */
  fp8: boolean;
  ncclVersion?: string;
}

/** One planned operation: the descriptor words for the native layer. */
export type OpWords = [
  kind: number,
  send: bigint,
  recv: bigint,
  count: number,
  dtype: number,
  redop: number,
  peer: number,
];

function where(shape: CommShape, op: string): string {
  return `${op} on communicator '${shape.name}' (rank ${shape.rank} of ${shape.size}, GPU ${shape.device})`;
}

/** Checks `dtype` and returns its code and size. */
export function checkDtype(shape: CommShape, op: string, dtype: unknown): { code: number; bytes: number } {
  const entry = typeof dtype === 'string' ? DTYPES[dtype as Dtype] : undefined;
  if (!entry || !Object.hasOwn(DTYPES, dtype as string)) {
    throw new BadArgumentError(
      `${where(shape, op)}: unknown dtype ${JSON.stringify(dtype)}; one of ${Object.keys(DTYPES).join(', ')}`,
    );
  }
  if (entry.code >= DTYPES.float8e4m3.code && !shape.fp8) {
    throw new BadArgumentError(
      `${where(shape, op)}: ${dtype as string} needs NCCL 2.24 or newer${shape.ncclVersion ? ` (this is ${shape.ncclVersion})` : ''}`,
    );
  }
  return entry;
}

export function checkReduceOp(shape: CommShape, op: string, reduce: unknown): number {
  if (typeof reduce !== 'string' || !Object.hasOwn(REDUCE_OPS, reduce)) {
    throw new BadArgumentError(
      `${where(shape, op)}: unknown reduction ${JSON.stringify(reduce)}; one of ${Object.keys(REDUCE_OPS).join(', ')}`,
    );
  }
  return REDUCE_OPS[reduce as ReduceOp];
}

/** Checks that `rank` names a rank of the communicator. */
export function checkRank(shape: CommShape, op: string, what: 'root' | 'peer', rank: unknown): number {
  if (typeof rank !== 'number' || !Number.isInteger(rank) || rank < 0 || rank >= shape.size) {
    throw new BadArgumentError(
      `${where(shape, op)}: ${what} ${String(rank)} is out of range (ranks are 0..${shape.size - 1})`,
    );
  }
  return rank;
}

export function checkTimeout(timeoutMs: unknown, what = 'timeoutMs'): number {
  if (typeof timeoutMs !== 'number' || !Number.isInteger(timeoutMs) || timeoutMs < 1 || timeoutMs > 2 ** 31 - 1) {
    throw new BadArgumentError(
      `${what} must be an integer number of milliseconds in [1, 2^31), got ${String(timeoutMs)}`,
    );
  }
  return timeoutMs;
}

/** Resolves device memory to its address and length, checking that it lives on the communicator's GPU. */
export function resolveMemory(
  shape: CommShape,
  op: string,
  what: string,
  memory: DeviceMemory | undefined,
): { address: bigint; bytes: number } {
  if (!memory || typeof memory !== 'object')
    throw new BadArgumentError(`${where(shape, op)}: ${what} buffer is missing`);
  if (memory.disposed === true) throw new DisposedError(`${where(shape, op)}: the ${what} buffer was disposed`);
  if (typeof memory.address !== 'bigint' || memory.address <= 0n || memory.address >= 2n ** 64n) {
    throw new BadArgumentError(`${where(shape, op)}: ${what} buffer has no valid device address`);
  }
  const device = typeof memory.device === 'number' ? memory.device : memory.device?.ordinal;
  if (device !== shape.device) {
    throw new BadArgumentError(
      `${where(shape, op)}: the ${what} buffer is on ${typeof device === 'number' && device >= 0 ? `GPU ${device}` : 'the host'}, not on GPU ${shape.device}`,
    );
  }
  const bytes = memory.bytes ?? memory.size;
  if (typeof bytes !== 'number' || !Number.isSafeInteger(bytes) || bytes < 0) {
    throw new BadArgumentError(`${where(shape, op)}: ${what} buffer has no valid length (bytes or size)`);
  }
  return { address: memory.address, bytes };
}

/** `count` as given, or the number of whole elements in `bytes`. */
function elementCount(
  shape: CommShape,
  op: string,
  what: string,
  bytes: number,
  elementBytes: number,
  dtype: string,
  count: unknown,
  parts = 1,
): number {
  if (count !== undefined) {
    if (typeof count !== 'number' || !Number.isSafeInteger(count) || count < 0) {
      throw new BadArgumentError(`${where(shape, op)}: count must be a non-negative integer, got ${String(count)}`);
    }
    return count;
  }
  const unit = elementBytes * parts;
  if (bytes % unit !== 0) {
    throw new BadArgumentError(
      `${where(shape, op)}: the ${what} buffer is ${bytes} bytes, not a whole number of ${parts > 1 ? `${parts} x ` : ''}${dtype} elements (${elementBytes} bytes each); pass count`,
    );
  }
  return bytes / unit;
}

function needBytes(
  shape: CommShape,
  op: string,
  what: string,
  have: number,
  count: number,
  elementBytes: number,
  dtype: string,
  per = 1,
): void {
  const need = count * elementBytes * per;
  if (have < need) {
    const elements = per > 1 ? `${per} x ${count} ${dtype} elements` : `${count} ${dtype} elements`;
    throw new BadArgumentError(
      `${where(shape, op)}: the ${what} buffer holds ${have} bytes, but ${elements} need ${need}`,
    );
  }
}

export interface ReduceArgs {
  send: DeviceMemory;
  recv?: DeviceMemory;
  dtype: Dtype;
  op?: ReduceOp;
  count?: number;
  timeoutMs?: number;
}
export interface GatherArgs {
  send: DeviceMemory;
  recv: DeviceMemory;
  dtype: Dtype;
  /** Elements each rank contributes (allGather) or receives (reduceScatter); default from the buffers. */
  count?: number;
  timeoutMs?: number;
}
export interface ReduceScatterArgs extends GatherArgs {
  op?: ReduceOp;
}
export interface BroadcastArgs {
  /** Read at the root only; defaults to `recv` (in place). */
  send?: DeviceMemory;
  recv: DeviceMemory;
  root: number;
  dtype: Dtype;
  count?: number;
  timeoutMs?: number;
}
export interface RootedReduceArgs extends ReduceArgs {
  root: number;
}
export interface PointToPointArgs {
  buffer: DeviceMemory;
  peer: number;
  dtype: Dtype;
  count?: number;
  timeoutMs?: number;
}
export interface AllToAllArgs {
  send: DeviceMemory;
  recv: DeviceMemory;
  dtype: Dtype;
  /** Elements exchanged with each rank; default: the send buffer split evenly over the ranks. */
  count?: number;
  timeoutMs?: number;
}

/** allReduce: recv[i] = op over ranks of send[i]; recv defaults to send (in place). */
export function planAllReduce(shape: CommShape, a: ReduceArgs): OpWords {
  const op = 'allReduce';
  const t = checkDtype(shape, op, a.dtype);
  const redop = checkReduceOp(shape, op, a.op ?? 'sum');
  const send = resolveMemory(shape, op, 'send', a.send);
  const recv = a.recv === undefined ? send : resolveMemory(shape, op, 'recv', a.recv);
  const count = elementCount(shape, op, 'send', send.bytes, t.bytes, a.dtype, a.count);
  needBytes(shape, op, 'send', send.bytes, count, t.bytes, a.dtype);
  needBytes(shape, op, 'recv', recv.bytes, count, t.bytes, a.dtype);
  return [OP_KIND.allReduce, send.address, recv.address, count, t.code, redop, 0];
}

/** allGather: recv holds every rank's `count` elements, rank r's at r * count. */
export function planAllGather(shape: CommShape, a: GatherArgs): OpWords {
  const op = 'allGather';
  const t = checkDtype(shape, op, a.dtype);
  const send = resolveMemory(shape, op, 'send', a.send);
  const recv = resolveMemory(shape, op, 'recv', a.recv);
  const count = elementCount(shape, op, 'send', send.bytes, t.bytes, a.dtype, a.count);
  needBytes(shape, op, 'send', send.bytes, count, t.bytes, a.dtype);
  needBytes(shape, op, 'recv', recv.bytes, count, t.bytes, a.dtype, shape.size);
  return [OP_KIND.allGather, send.address, recv.address, count, t.code, 0, 0];
}

/** reduceScatter: rank r receives the reduction of every rank's block r (`count` elements). */
export function planReduceScatter(shape: CommShape, a: ReduceScatterArgs): OpWords {
  const op = 'reduceScatter';
  const t = checkDtype(shape, op, a.dtype);
  const redop = checkReduceOp(shape, op, a.op ?? 'sum');
  const send = resolveMemory(shape, op, 'send', a.send);
  const recv = resolveMemory(shape, op, 'recv', a.recv);
  const count = elementCount(shape, op, 'recv', recv.bytes, t.bytes, a.dtype, a.count);
  needBytes(shape, op, 'send', send.bytes, count, t.bytes, a.dtype, shape.size);
  needBytes(shape, op, 'recv', recv.bytes, count, t.bytes, a.dtype);
  return [OP_KIND.reduceScatter, send.address, recv.address, count, t.code, redop, 0];
}

/** broadcast: every rank's recv gets the root's send. */
export function planBroadcast(shape: CommShape, a: BroadcastArgs): OpWords {
  const op = 'broadcast';
  const t = checkDtype(shape, op, a.dtype);
  const root = checkRank(shape, op, 'root', a.root);
  const recv = resolveMemory(shape, op, 'recv', a.recv);
  const send = a.send === undefined ? recv : resolveMemory(shape, op, 'send', a.send);
  const count = elementCount(shape, op, 'recv', recv.bytes, t.bytes, a.dtype, a.count);
  needBytes(shape, op, 'recv', recv.bytes, count, t.bytes, a.dtype);
  if (shape.rank === root) needBytes(shape, op, 'send', send.bytes, count, t.bytes, a.dtype);
  return [OP_KIND.broadcast, send.address, recv.address, count, t.code, 0, root];
}

/** reduce: the root's recv gets op over ranks of send; recv defaults to send and is unused elsewhere. */
export function planReduce(shape: CommShape, a: RootedReduceArgs): OpWords {
  const op = 'reduce';
  const t = checkDtype(shape, op, a.dtype);
  const redop = checkReduceOp(shape, op, a.op ?? 'sum');
  const root = checkRank(shape, op, 'root', a.root);
  const send = resolveMemory(shape, op, 'send', a.send);
  const recv = a.recv === undefined ? send : resolveMemory(shape, op, 'recv', a.recv);
  const count = elementCount(shape, op, 'send', send.bytes, t.bytes, a.dtype, a.count);
  needBytes(shape, op, 'send', send.bytes, count, t.bytes, a.dtype);
  if (shape.rank === root) needBytes(shape, op, 'recv', recv.bytes, count, t.bytes, a.dtype);
  return [OP_KIND.reduce, send.address, recv.address, count, t.code, redop, root];
}

/** send / recv: point to point; the peer must make the matching call with the same count and dtype. */
export function planPointToPoint(shape: CommShape, kind: 'send' | 'recv', a: PointToPointArgs): OpWords {
  const t = checkDtype(shape, kind, a.dtype);
  const peer = checkRank(shape, kind, 'peer', a.peer);
  const buffer = resolveMemory(shape, kind, kind === 'send' ? 'send' : 'recv', a.buffer);
  const count = elementCount(shape, kind, kind, buffer.bytes, t.bytes, a.dtype, a.count);
  needBytes(shape, kind, kind, buffer.bytes, count, t.bytes, a.dtype);
  return kind === 'send'
    ? [OP_KIND.send, buffer.address, 0n, count, t.code, 0, peer]
    : [OP_KIND.recv, 0n, buffer.address, count, t.code, 0, peer];
}

/**
 * allToAll as grouped send/recv: block p (`count` elements) of send goes to rank p, and block p of recv
 * comes from rank p.
 */
export function planAllToAll(shape: CommShape, a: AllToAllArgs): OpWords[] {
  const op = 'allToAll';
  const t = checkDtype(shape, op, a.dtype);
  const send = resolveMemory(shape, op, 'send', a.send);
  const recv = resolveMemory(shape, op, 'recv', a.recv);
  const count = elementCount(shape, op, 'send', send.bytes, t.bytes, a.dtype, a.count, shape.size);
  needBytes(shape, op, 'send', send.bytes, count, t.bytes, a.dtype, shape.size);
  needBytes(shape, op, 'recv', recv.bytes, count, t.bytes, a.dtype, shape.size);
  const block = BigInt(count * t.bytes);
  const words: OpWords[] = [];
  for (let peer = 0; peer < shape.size; peer++) {
    words.push([OP_KIND.send, send.address + BigInt(peer) * block, 0n, count, t.code, 0, peer]);
    words.push([OP_KIND.recv, 0n, recv.address + BigInt(peer) * block, count, t.code, 0, peer]);
  }
  return words;
}

/** Packs planned operations into the descriptor the native layer reads. */
export function encodeOps(ops: readonly OpWords[]): BigUint64Array {
  const out = new BigUint64Array(ops.length * DESCRIPTOR_WORDS);
  let i = 0;
  for (const [kind, send, recv, count, dtype, redop, peer] of ops) {
    out[i++] = BigInt(kind);
    out[i++] = send;
    out[i++] = recv;
    out[i++] = BigInt(count);
    out[i++] = BigInt(dtype);
    out[i++] = BigInt(redop);
    out[i++] = BigInt(peer);
  }
  return out;
}

/**
 * Bus-bandwidth factor per operation over n ranks, as nccl-tests defines it: what each rank's links
 * carry relative to the buffer size, so busbw can be compared with the hardware's link rate.
 */
export function busBandwidthFactor(op: OpName | 'allToAll' | 'sendRecv', ranks: number): number {
  switch (op) {
    case 'allReduce':
      return (2 * (ranks - 1)) / ranks;
    case 'allGather':
    case 'reduceScatter':
    case 'allToAll':
      return (ranks - 1) / ranks;
    default:
      return 1;
  }
}

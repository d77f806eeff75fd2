import { describe, expect, it } from 'vitest';
import {
  BadArgumentError,
  CollectiveError,
  CollectiveTimeoutError,
  Communicator,
  CommunicatorAbortedError,
  DisposedError,
  NcclUnavailableError,
  busBandwidthFactor,
  fromNative,
} from '../lib/index.js';
import {
  DESCRIPTOR_WORDS,
  OP_KIND,
  encodeOps,
  planAllGather,
  planAllReduce,
  planAllToAll,
  planBroadcast,
  planPointToPoint,
  planReduce,
  planReduceScatter,
  type CommShape,
  type DeviceMemory,
} from '../lib/collectives/ops.js';

// Argument validation of the collectives, without a GPU: every operation is planned by a pure function
// of the communicator's shape, so each rule is checked here; a live communicator applies the same ones
// (test/gpu/03.collectives.gpu.test.ts checks that too).
const shape: CommShape = { name: 'tp', rank: 1, size: 4, device: 0, fp8: true, ncclVersion: '2.28.3' };
const mem = (bytes: number, device: DeviceMemory['device'] = 0, address = 0x7f0000000000n): DeviceMemory => ({
  device,
  address,
  bytes,
});
const buf = mem(4096);

describe('collectives: argument validation', () => {
  it('plans a valid all-reduce into descriptor words', () => {
    const recv = mem(4096, 0, 0x7f0000100000n);
    expect(planAllReduce(shape, { send: buf, recv, dtype: 'bfloat16', op: 'max' })).toEqual([
      OP_KIND.allReduce,
      0x7f0000000000n,
      0x7f0000100000n,
      2048,
      9,
      2,
      0,
    ]);
    // recv defaults to send (in place), op to sum, count to the whole buffer.
    expect(planAllReduce(shape, { send: buf, dtype: 'float32' })).toEqual([0, buf.address, buf.address, 1024, 7, 0, 0]);
    const words = encodeOps([planAllReduce(shape, { send: buf, dtype: 'int8', count: 10 })]);
    expect(words).toBeInstanceOf(BigUint64Array);
    expect(words.length).toBe(DESCRIPTOR_WORDS);
    expect([...words]).toEqual([0n, buf.address, buf.address, 10n, 0n, 0n, 0n]);
  });

  it('rejects unknown dtypes and reductions, and fp8 where NCCL lacks it', () => {
    expect(() => planAllReduce(shape, { send: buf, dtype: 'complex64' as never })).toThrow(BadArgumentError);
    expect(() => planAllReduce(shape, { send: buf, dtype: 'toString' as never })).toThrow(/unknown dtype "toString"/);
    expect(() => planAllReduce(shape, { send: buf, dtype: 'float32', op: 'xor' as never })).toThrow(
      /unknown reduction "xor"/,
    );
    expect(planAllReduce(shape, { send: buf, dtype: 'float8e4m3' })[4]).toBe(10);
    const old = { ...shape, fp8: false, ncclVersion: '2.21.5' };
    expect(() => planAllGather(old, { send: buf, recv: mem(1 << 16), dtype: 'float8e5m2' })).toThrow(
      /float8e5m2 needs NCCL 2\.24 or newer \(this is 2\.21\.5\)/,
    );
  });

  it('rejects size mismatches, naming the communicator and the operation', () => {
    expect(() => planAllReduce(shape, { send: mem(1001), dtype: 'float32' })).toThrow(
      /allReduce on communicator 'tp' \(rank 1 of 4, GPU 0\): the send buffer is 1001 bytes, not a whole number of float32 elements \(4 bytes each\); pass count/,
    );
    expect(() => planAllReduce(shape, { send: buf, dtype: 'float32', count: 1025 })).toThrow(
      /the send buffer holds 4096 bytes, but 1025 float32 elements need 4100/,
    );
    expect(() => planAllReduce(shape, { send: buf, recv: mem(100), dtype: 'uint8' })).toThrow(
      /recv buffer holds 100 bytes/,
    );
    // allGather: recv holds every rank's block; reduceScatter: send does.
    expect(() => planAllGather(shape, { send: buf, recv: mem(4096 * 3), dtype: 'float16' })).toThrow(
      /recv buffer holds 12288 bytes, but 4 x 2048 float16 elements need 16384/,
    );
    expect(planAllGather(shape, { send: buf, recv: mem(4096 * 4), dtype: 'float16' })[3]).toBe(2048);
    expect(() => planReduceScatter(shape, { send: mem(1000), recv: mem(1000), dtype: 'int32' })).toThrow(
      /send buffer holds 1000 bytes/,
    );
    expect(planReduceScatter(shape, { send: mem(4000), recv: mem(1000), dtype: 'int32' })[3]).toBe(250);
    expect(() => planAllToAll(shape, { send: mem(4102), recv: mem(4102), dtype: 'int8' })).toThrow(
      /not a whole number of 4 x int8 elements/,
    );
    expect(() => planAllReduce(shape, { send: buf, dtype: 'float32', count: -1 })).toThrow(
      /count must be a non-negative integer/,
    );
    expect(() => planAllReduce(shape, { send: buf, dtype: 'float32', count: 1.5 })).toThrow(
      /count must be a non-negative integer/,
    );
  });

  it('rejects roots and peers out of range', () => {
    for (const root of [4, -1, 1.5, Number.NaN, '0' as unknown as number]) {
      expect(() => planBroadcast(shape, { recv: buf, root, dtype: 'uint8' })).toThrow(BadArgumentError);
      expect(() => planReduce(shape, { send: buf, root, dtype: 'uint8' })).toThrow(BadArgumentError);
      expect(() => planPointToPoint(shape, 'send', { buffer: buf, peer: root, dtype: 'uint8' })).toThrow(
        BadArgumentError,
      );
    }
    expect(() => planBroadcast(shape, { recv: buf, root: 4, dtype: 'uint8' })).toThrow(
      /root 4 is out of range \(ranks are 0\.\.3\)/,
    );
    expect(() => planPointToPoint(shape, 'recv', { buffer: buf, peer: 9, dtype: 'uint8' })).toThrow(
      /recv on communicator 'tp'.*peer 9 is out of range/,
    );
    expect(planBroadcast(shape, { recv: buf, root: 3, dtype: 'uint8' })[6]).toBe(3);
  });

  it('only the root needs the broadcast source and the reduce destination', () => {
    // Rank 1 is not the root: a small send (broadcast) or recv (reduce) is not read or written there.
    expect(() => planBroadcast(shape, { send: mem(16), recv: buf, root: 0, dtype: 'uint8' })).not.toThrow();
    expect(() => planBroadcast(shape, { send: mem(16), recv: buf, root: 1, dtype: 'uint8' })).toThrow(
      /send buffer holds 16 bytes/,
    );
    expect(() => planReduce(shape, { send: buf, recv: mem(16), root: 0, dtype: 'uint8' })).not.toThrow();
    expect(() => planReduce(shape, { send: buf, recv: mem(16), root: 1, dtype: 'uint8' })).toThrow(
      /recv buffer holds 16 bytes/,
    );
  });

  it('checks that buffers live on the communicator GPU, have an address and a length, and are not disposed', () => {
    // A DeviceBuffer names its device as an object with an ordinal; a transfer region by number (-1: host).
    expect(() => planAllReduce(shape, { send: mem(4096, { ordinal: 0 }), dtype: 'float32' })).not.toThrow();
    expect(() => planAllReduce(shape, { send: mem(4096, { ordinal: 1 }), dtype: 'float32' })).toThrow(
      /send buffer is on GPU 1, not on GPU 0/,
    );
    expect(() => planAllReduce(shape, { send: mem(4096, -1), dtype: 'float32' })).toThrow(/send buffer is on the host/);
    expect(() => planAllReduce(shape, { send: mem(4096, 0, 0n), dtype: 'float32' })).toThrow(/no valid device address/);
    expect(() => planAllReduce(shape, { send: { device: 0, address: 1n << 40n }, dtype: 'float32' })).toThrow(
      /no valid length/,
    );
    expect(planAllReduce(shape, { send: { device: 0, address: 1n << 40n, size: 8 }, dtype: 'float32' })[3]).toBe(2);
    expect(() => planAllReduce(shape, { send: { ...buf, disposed: true }, dtype: 'float32' })).toThrow(DisposedError);
    expect(() => planAllReduce(shape, { send: undefined as never, dtype: 'float32' })).toThrow(
      /send buffer is missing/,
    );
  });

  it('builds all-to-all from one send and one recv per rank, block p to and from rank p', () => {
    const send = mem(64, 0, 0x1000n);
    const recv = mem(64, 0, 0x9000n);
    const ops = planAllToAll(shape, { send, recv, dtype: 'int32' });
    expect(ops).toHaveLength(8);
    expect(ops.filter((o) => o[0] === OP_KIND.send).map((o) => [o[1], o[6], o[3]])).toEqual([
      [0x1000n, 0, 4],
      [0x1010n, 1, 4],
      [0x1020n, 2, 4],
      [0x1030n, 3, 4],
    ]);
    expect(ops.filter((o) => o[0] === OP_KIND.recv).map((o) => [o[2], o[6]])).toEqual([
      [0x9000n, 0],
      [0x9010n, 1],
      [0x9020n, 2],
      [0x9030n, 3],
    ]);
  });

  it('checks Communicator.init and initAll arguments before anything is loaded', async () => {
    const id = new Uint8Array(128);
    const bad: [string, () => Promise<unknown>][] = [
      ['rank = size', () => Communicator.init({ id, rank: 2, size: 2, device: 0 })],
      ['negative rank', () => Communicator.init({ id, rank: -1, size: 2, device: 0 })],
      ['size 0', () => Communicator.init({ id, rank: 0, size: 0, device: 0 })],
      ['short id', () => Communicator.init({ id: new Uint8Array(64), rank: 0, size: 2, device: 0 })],
      ['negative device', () => Communicator.init({ id, rank: 0, size: 2, device: -1 })],
      ['timeout 0', () => Communicator.init({ id, rank: 0, size: 2, device: 0, timeoutMs: 0 })],
      ['fractional timeout', () => Communicator.init({ id, rank: 0, size: 2, device: 0, timeoutMs: 1.5 })],
      ['empty name', () => Communicator.init({ id, rank: 0, size: 2, device: 0, name: '' })],
      ['no devices', () => Communicator.initAll({ devices: [] })],
      ['duplicate devices', () => Communicator.initAll({ devices: [0, 0] })],
    ];
    for (const [what, call] of bad) await expect(call(), what).rejects.toBeInstanceOf(BadArgumentError);
    await expect(Communicator.init({ id, rank: 5, size: 2, device: 0, name: 'tp' })).rejects.toThrow(
      /communicator 'tp': rank 5 is out of range \(ranks are 0\.\.1\)/,
    );
  });

  it('bus-bandwidth factors follow nccl-tests', () => {
    expect(busBandwidthFactor('allReduce', 2)).toBe(1);
    expect(busBandwidthFactor('allReduce', 8)).toBe(1.75);
    expect(busBandwidthFactor('allGather', 4)).toBe(0.75);
    expect(busBandwidthFactor('reduceScatter', 2)).toBe(0.5);
    expect(busBandwidthFactor('allToAll', 2)).toBe(0.5);
    expect(busBandwidthFactor('broadcast', 8)).toBe(1);
    expect(busBandwidthFactor('reduce', 8)).toBe(1);
    expect(busBandwidthFactor('sendRecv', 2)).toBe(1);
  });
});

describe('collectives: native errors map to typed errors', () => {
  const nativeError = (code: string, extra: Record<string, string> = {}) =>
    Object.assign(new Error(`communicator 'tp' (rank 0 of 2, GPU 0): allReduce (float32 sum, 4 elements) ${code}`), {
      code,
      ...extra,
    });

  it('keeps the communicator, the operation and the NCCL result', () => {
    const details = {
      communicator: 'tp',
      operation: 'allReduce (float32 sum, 4 elements)',
      ncclResult: 'ncclRemoteError',
    };
    const timeout = fromNative(nativeError('TANDEM_NCCL_TIMEOUT', details));
    expect(timeout).toBeInstanceOf(CollectiveTimeoutError);
    expect(timeout).toBeInstanceOf(CollectiveError);
    expect(timeout).toMatchObject({ ...details, code: 'TANDEM_NCCL_TIMEOUT', name: 'CollectiveTimeoutError' });
    expect(fromNative(nativeError('TANDEM_NCCL_ERROR', details))).toMatchObject({
      name: 'CollectiveError',
      ncclResult: 'ncclRemoteError',
    });
    const aborted = fromNative(nativeError('TANDEM_NCCL_ABORTED', { communicator: 'tp' }));
    expect(aborted).toBeInstanceOf(CommunicatorAbortedError);
    expect((aborted as CommunicatorAbortedError).operation).toBeUndefined();
    const unavailable = fromNative(
      Object.assign(new Error('NCCL unavailable: no usable GPU'), { code: 'TANDEM_NCCL_UNAVAILABLE' }),
    );
    expect(unavailable).toBeInstanceOf(NcclUnavailableError);
    expect((unavailable as NcclUnavailableError).reason).toBe('no usable GPU');
  });
});

import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  CudaDevice,
  OutOfBoundsError,
  RemoteDisconnectError,
  RemoteRegionGoneError,
  TransferAgent,
  type DeviceBuffer,
  type TransferPlan,
  type Region,
  type RemotePeer,
} from '../../lib/index.js';
import { fillPatternOnGpu, mismatchesOnGpu } from '../helpers/gpu-pattern.js';
import { gpuGate } from '../helpers/gpu.js';
import { fillPattern } from '../helpers/pattern.js';
import { gpuTransferPair, type GpuTransferPair } from '../helpers/gpu-pair.js';
import { PeerProcess } from '../helpers/peer.js';

// cuda-ipc between two real processes: device memory of this process (the initiator) and of a child
// process (the target), on one GPU and across two. Bytes are checked on the GPU with a pattern kernel.
const gate = await gpuGate(1);
const BLOCK = 64 << 10;
const BLOCKS = 512; // 32 MiB per side
const pairs: [number, number][] = gate.run
  ? gate.caps.cuda.devices.length >= 2
    ? [
        [0, 0],
        [0, 1],
        [1, 0],
      ]
    : [[0, 0]]
  : [[0, 0]];

/** A WRITE of `blocks` blocks from local block `src` to remote block `dst`. */
const blockWrite = (
  agent: TransferAgent,
  peer: string,
  local: Region,
  remote: number,
  dst: number,
  src: number,
  blocks: number,
) =>
  agent.prepare({
    op: 'WRITE',
    peer,
    local,
    remote,
    pieces: {
      localOffsets: Float64Array.of(src * BLOCK),
      remoteOffsets: Float64Array.of(dst * BLOCK),
      lengths: blocks * BLOCK,
    },
  });

/** A plan of equal pieces, `blocks` blocks each, at the given local and remote block indices. */
const blockPlan = (
  agent: TransferAgent,
  peer: string,
  local: Region,
  remote: number,
  op: 'READ' | 'WRITE',
  localBlocks: number[],
  remoteBlocks: number[],
  blocks: number,
) =>
  agent.prepare({
    op,
    peer,
    local,
    remote,
    pieces: {
      localOffsets: Float64Array.from(localBlocks, (b) => b * BLOCK),
      remoteOffsets: Float64Array.from(remoteBlocks, (b) => b * BLOCK),
      lengths: blocks * BLOCK,
    },
  });

/**
 * Posts `plan` until its copy strategy is settled (its timed trials done), then once more: that post, through
 * the agent's thread, leaves the plan resolved for the posting thread to issue later posts itself.
 */
async function settle(plan: TransferPlan) {
  for (let i = 0; i < 12 && plan.copyStrategy === 'undecided'; i++) await plan.post();
  expect(plan.copyStrategy).not.toBe('undecided');
  await plan.post();
}

/**
 * Checks on the target's GPU that remote block run dst[i] holds the pattern `seed` of local block run src[i]
 * (`blocks` blocks each), and, where `untouchedSeed` is given, that a block outside every run still holds it.
 */
async function expectLanded(
  target: PeerProcess,
  remote: number,
  at: { src: number[]; dst: number[]; blocks: number; seed: number; untouchedSeed?: number },
  label: string,
) {
  for (let i = 0; i < at.src.length; i++) {
    const r = await target.request<{ mismatches: number }>('checkDevice', {
      region: remote,
      offset: at.dst[i]! * BLOCK,
      length: at.blocks * BLOCK,
      seed: at.seed,
      base: at.src[i]! * BLOCK,
    });
    expect(r.mismatches, `${label}: block ${at.src[i]} -> ${at.dst[i]}`).toBe(0);
  }
  if (at.untouchedSeed === undefined) return;
  const written = new Set(at.dst.flatMap((d) => Array.from({ length: at.blocks }, (_, k) => d + k)));
  const untouched = [...Array(BLOCKS).keys()].find((b) => !written.has(b))!;
  const r = await target.request<{ mismatches: number }>('checkDevice', {
    region: remote,
    offset: untouched * BLOCK,
    length: BLOCK,
    seed: at.untouchedSeed,
    base: untouched * BLOCK,
  });
  expect(r.mismatches, `${label}: a block nobody wrote`).toBe(0);
}

describe.skipIf(!gate.run).each(pairs)('cuda-ipc: initiator on GPU %i, target on GPU %i', (localGpu, remoteGpu) => {
  let target: PeerProcess;
  let agent: TransferAgent;
  let device: CudaDevice;
  let buffer: DeviceBuffer;
  let local: Region;
  let peer: RemotePeer;
  let remote: number;
  const SEED_LOCAL = 11;
  const SEED_REMOTE = 77;

  let pair: GpuTransferPair;

  beforeAll(async () => {
    pair = await gpuTransferPair({
      name: `gpu-${localGpu}-${remoteGpu}`,
      localGpu,
      remoteGpu,
      bytes: BLOCK * BLOCKS,
      seedLocal: SEED_LOCAL,
      seedRemote: SEED_REMOTE,
    });
    ({ target, agent, device, buffer, local, peer, remote } = pair);
  });

  afterAll(async () => {
    await pair?.dispose();
  });

  const scattered = (n: number, mul: number, add: number) =>
    Array.from({ length: n }, (_, i) => (i * mul + add) % BLOCKS);

  it('warmup opens the peer GPU region before any transfer, once, and transfers work after it', async () => {
    expect(await agent.warmup(peer.name)).toEqual({ deviceRegions: 1 });
    expect(await agent.warmup(peer.name)).toEqual({ deviceRegions: 1 }); // already open: nothing new
  });

  it('WRITE: 256 scattered 64 KiB blocks land where asked, checked on the target GPU', async () => {
    const src = scattered(256, 37, 5);
    const dst = scattered(256, 101, 3); // a permutation (101 and 512 are coprime)
    const plan = blockPlan(agent, peer.name, local, remote, 'WRITE', src, dst, 1);
    expect(plan.backend).toBe('cuda-ipc');
    await plan.post();
    // A block nobody wrote still holds the target's own pattern.
    await expectLanded(target, remote, { src, dst, blocks: 1, seed: SEED_LOCAL, untouchedSeed: SEED_REMOTE }, 'WRITE');
  });

  it('READ: scattered blocks come back into local GPU memory', async () => {
    await target.request('fillDevice', { region: remote, seed: SEED_REMOTE });
    const src = scattered(128, 53, 1); // remote blocks
    const dst = scattered(128, 29, 7); // local blocks
    const plan = agent.prepare({
      op: 'READ',
      peer: peer.name,
      local,
      remote,
      pieces: {
        localOffsets: Float64Array.from(dst, (b) => b * BLOCK),
        remoteOffsets: Float64Array.from(src, (b) => b * BLOCK),
        lengths: BLOCK,
      },
    });
    await plan.post();
    for (let i = 0; i < src.length; i++) {
      expect(
        await mismatchesOnGpu(device, buffer, SEED_REMOTE, dst[i]! * BLOCK, BLOCK, src[i]! * BLOCK),
        `block ${src[i]}`,
      ).toBe(0);
    }
    await fillPatternOnGpu(device, buffer, SEED_LOCAL);
  });

  it('the notification arrives after the data is visible on the target GPU', async () => {
    for (let round = 0; round < 4; round++) {
      const dstBlock = (round * 97 + 13) % (BLOCKS - 8);
      const plan = agent.prepare({
        op: 'WRITE',
        peer: peer.name,
        local,
        remote,
        pieces: {
          localOffsets: Float64Array.of(0),
          remoteOffsets: Float64Array.of(dstBlock * BLOCK),
          lengths: 8 * BLOCK,
        },
      });
      const note = JSON.stringify({
        round,
        check: { region: remote, offset: dstBlock * BLOCK, length: 8 * BLOCK, seed: SEED_LOCAL, base: 0 },
      });
      await plan.post({ notify: note });
      const event = await target.nextEvent((e) => e.event === 'notification' && e.text === note);
      expect((event as { mismatches?: number }).mismatches, `round ${round}`).toBe(0);
    }
  });

  it('a plan of few pieces, posted again, is issued by the calling thread; it never overtakes posts queued before it', async () => {
    const eight = (dstBlock: number, srcBlock = 0) =>
      blockWrite(agent, peer.name, local, remote, dstBlock, srcBlock, 8);
    // Posted again: the calling thread issues it; the data is in place before the notification is seen.
    const plan = eight(40); // one 512 KiB piece: the kernel and the copy engines are timed first
    await settle(plan);
    const direct = agent.directPosts;
    for (let round = 0; round < 4; round++) {
      const note = JSON.stringify({
        direct: round,
        check: { region: remote, offset: 40 * BLOCK, length: 8 * BLOCK, seed: SEED_LOCAL, base: 0 },
      });
      await plan.post({ notify: note });
      const event = await target.nextEvent((e) => e.event === 'notification' && e.text === note);
      expect((event as { mismatches?: number }).mismatches, `round ${round}`).toBe(0);
    }
    expect(agent.directPosts - direct).toBe(4);

    // Eight new plans queue for the agent's thread (each 8 blocks from local block 0 onto remote block 0),
    // then a resolved plan copies local blocks 100.. onto the same place: it must land last.
    const last = eight(0, 100);
    await settle(last);
    const queued = Array.from({ length: 8 }, () => eight(0, 0));
    await Promise.all([...queued.map((q) => q.post()), last.post()]);
    const r = await target.request<{ mismatches: number }>('checkDevice', {
      region: remote,
      offset: 0,
      length: 8 * BLOCK,
      seed: SEED_LOCAL,
      base: 100 * BLOCK,
    });
    expect(r.mismatches, 'the last post landed last').toBe(0);
  });

  it('41 posts issued back to back land in post order, each notification after its data, and a later plan of other pieces lands last', async () => {
    await target.request('fillDevice', { region: remote, seed: SEED_REMOTE });
    // 16 MiB first, then 40 one-block posts with notifications while it runs, then a plan of other pieces
    // (copied by another strategy while it is being timed) onto four of the same blocks: it must land last.
    const big = blockWrite(agent, peer.name, local, remote, 0, 256, 256);
    const src = scattered(40, 53, 7);
    const small = src.map((b, i) => blockWrite(agent, peer.name, local, remote, 300 + i, b, 1));
    const lastSrc = [120, 77, 9, 200];
    const last = blockPlan(agent, peer.name, local, remote, 'WRITE', lastSrc, [300, 301, 302, 303], 1);
    const notes = small.map((_, i) =>
      JSON.stringify({
        backToBack: i,
        check: { region: remote, offset: (300 + i) * BLOCK, length: BLOCK, seed: SEED_LOCAL, base: src[i]! * BLOCK },
      }),
    );
    await Promise.all([big.post(), ...small.map((p, i) => p.post({ notify: notes[i] })), last.post()]);
    for (let i = 4; i < 40; i++) {
      const event = await target.nextEvent((e) => e.event === 'notification' && e.text === notes[i]);
      expect((event as { mismatches?: number }).mismatches, `post ${i}`).toBe(0);
    }
    await expectLanded(
      target,
      remote,
      {
        src: [256, ...src.slice(4), ...lastSrc],
        dst: [0, ...Array.from({ length: 36 }, (_, i) => 304 + i), 300, 301, 302, 303],
        blocks: 1,
        seed: SEED_LOCAL,
      },
      'after the posts',
    );
    await target.request('fillDevice', { region: remote, seed: SEED_REMOTE });
  });

  it('pieces of 256 KiB and up: the first posts time the kernel, per-piece and batched copies; each lands the data', async () => {
    const src = scattered(24, 37, 5).map((b) => b & ~3); // 4-block (256 KiB) pieces
    const dst = Array.from({ length: 24 }, (_, i) => ((i * 5 + 3) % (BLOCKS / 4)) * 4);
    expect(new Set(dst).size).toBe(24);
    const plan = blockPlan(agent, peer.name, local, remote, 'WRITE', src, dst, 4);
    expect(plan.copyStrategy).toBe('undecided');
    const seen = new Set<string>();
    for (let round = 0; round < 8; round++) {
      await target.request('fillDevice', { region: remote, seed: SEED_REMOTE }); // each post's bytes checked afresh
      await plan.post();
      seen.add(plan.copyStrategy!);
      await expectLanded(
        target,
        remote,
        { src, dst, blocks: 4, seed: SEED_LOCAL },
        `round ${round} (${plan.copyStrategy})`,
      );
    }
    // Three candidates, two timed trials each: settled by the sixth post's completion.
    expect(['kernel', 'copy-engine', 'batch']).toContain(plan.copyStrategy);
    expect(seen.has('undecided')).toBe(true);
    await target.request('fillDevice', { region: remote, seed: SEED_REMOTE });
  });

  it('16 scattered pieces of pinned host memory to the target GPU and back go by the copy engines (the kernel is for device memory)', async () => {
    const pinned = agent.allocPinned(32 * BLOCK);
    fillPattern(pinned.view!, 6, 0);
    const src = Array.from({ length: 16 }, (_, i) => (i * 7 + 3) % 32); // pinned blocks
    const dst = Array.from({ length: 16 }, (_, i) => 400 + ((i * 5) % 16) * 2); // remote blocks, gaps between
    const plan = (op: 'READ' | 'WRITE') =>
      agent.prepare({
        op,
        peer: peer.name,
        local: pinned,
        remote,
        pieces: {
          localOffsets: Float64Array.from(src, (b) => b * BLOCK),
          remoteOffsets: Float64Array.from(dst, (b) => b * BLOCK),
          lengths: BLOCK,
        },
      });
    const write = plan('WRITE');
    for (let round = 0; round < 3; round++) await write.post();
    expect(write.copyStrategy).toBe('copy-engine');
    for (let i = 0; i < 16; i++) {
      const r = await target.request<{ mismatches: number }>('checkDevice', {
        region: remote,
        offset: dst[i]! * BLOCK,
        length: BLOCK,
        seed: 6,
        base: src[i]! * BLOCK,
      });
      expect(r.mismatches, `piece ${i}`).toBe(0);
    }
    pinned.view!.fill(0);
    const read = plan('READ');
    await read.post();
    expect(read.copyStrategy).toBe('copy-engine');
    const expected = new Uint8Array(32 * BLOCK);
    fillPattern(expected, 6, 0);
    for (const b of src) {
      const at = b * BLOCK;
      expect(
        Buffer.compare(
          Buffer.from(pinned.view!.subarray(at, at + BLOCK)),
          Buffer.from(expected.subarray(at, at + BLOCK)),
        ),
        `block ${b}`,
      ).toBe(0);
    }
    agent.deregister(pinned);
    await target.request('fillDevice', { region: remote, seed: SEED_REMOTE });
  });

  it('pinned host memory to the target GPU and back', async () => {
    const pinned = agent.allocPinned(4 * BLOCK);
    fillPattern(pinned.view!, 5, 0);
    await agent
      .prepare({
        op: 'WRITE',
        peer: peer.name,
        local: pinned,
        remote,
        pieces: { localOffsets: Float64Array.of(0), remoteOffsets: Float64Array.of(BLOCK * 100), lengths: 4 * BLOCK },
      })
      .post();
    const r = await target.request<{ mismatches: number }>('checkDevice', {
      region: remote,
      offset: BLOCK * 100,
      length: 4 * BLOCK,
      seed: 5,
      base: 0,
    });
    expect(r.mismatches).toBe(0);
    pinned.view!.fill(0);
    await agent
      .prepare({
        op: 'READ',
        peer: peer.name,
        local: pinned,
        remote,
        pieces: { localOffsets: Float64Array.of(0), remoteOffsets: Float64Array.of(BLOCK * 100), lengths: 4 * BLOCK },
      })
      .post();
    const expected = new Uint8Array(4 * BLOCK);
    fillPattern(expected, 5, 0);
    expect(Buffer.compare(Buffer.from(pinned.view!), Buffer.from(expected))).toBe(0);
    agent.deregister(pinned);
  });

  it('out-of-bounds device pieces are refused before anything moves', () => {
    expect(() =>
      agent.prepare({
        op: 'WRITE',
        peer: peer.name,
        local,
        remote,
        pieces: { localOffsets: Float64Array.of(0), remoteOffsets: Float64Array.of(BLOCK * BLOCKS - 16), lengths: 32 },
      }),
    ).toThrow(OutOfBoundsError);
  });
});

/** A pair whose initiator's agent is made with TANDEM_CUDA_COPY=`copy`: that strategy wherever it can run. */
async function forcedCopyPair(
  copy: 'batch' | 'kernel',
  localGpu: number,
  remoteGpu: number,
  seedLocal: number,
  seedRemote: number,
): Promise<GpuTransferPair> {
  process.env.TANDEM_CUDA_COPY = copy; // read when the agent is created
  try {
    return await gpuTransferPair({
      name: `${copy}-${localGpu}-${remoteGpu}`,
      localGpu,
      remoteGpu,
      bytes: BLOCK * BLOCKS,
      seedLocal,
      seedRemote,
    });
  } finally {
    delete process.env.TANDEM_CUDA_COPY;
  }
}

// Batched copy-engine copies (cuMemcpyBatchAsync, driver 12.8+), forced for every plan with TANDEM_CUDA_COPY
// so that plans of any piece size take that path: sub-batch boundaries, both directions, notifications.
const [driverMajor = 0, driverMinor = 0] = (gate.run ? (gate.caps.cuda.driverVersion ?? '0') : '0')
  .split('.')
  .map(Number);
const batchDriver = gate.run && driverMajor * 100 + driverMinor >= 1208;
describe.skipIf(!batchDriver).each(pairs.filter(([l, r]) => l !== r || pairs.length === 1).slice(0, 1))(
  'cuda-ipc, batched copies (TANDEM_CUDA_COPY=batch): initiator on GPU %i, target on GPU %i',
  (localGpu, remoteGpu) => {
    let pair: GpuTransferPair;
    const SEED_LOCAL = 21;
    const SEED_REMOTE = 87;
    beforeAll(async () => {
      pair = await forcedCopyPair('batch', localGpu, remoteGpu, SEED_LOCAL, SEED_REMOTE);
    });
    afterAll(async () => {
      await pair?.dispose();
    });

    const plan = (op: 'READ' | 'WRITE', local: number[], remote: number[], blocks: number) =>
      blockPlan(pair.agent, pair.peer.name, pair.local, pair.remote, op, local, remote, blocks);

    it('WRITE: 301 scattered 64 KiB blocks (calls of 2, 8, 32 and the other 259 copies) land where asked', async () => {
      const src = Array.from({ length: 301 }, (_, i) => (i * 37 + 5) % BLOCKS);
      const dst = Array.from({ length: 301 }, (_, i) => (i * 101 + 3) % BLOCKS);
      const p = plan('WRITE', src, dst, 1);
      expect(p.pieces).toBe(301);
      for (let round = 0; round < 2; round++) {
        await pair.target.request('fillDevice', { region: pair.remote, seed: SEED_REMOTE });
        await p.post();
        expect(p.copyStrategy).toBe('batch');
        const at = { src, dst, blocks: 1, seed: SEED_LOCAL, untouchedSeed: SEED_REMOTE };
        await expectLanded(pair.target, pair.remote, at, `round ${round}`);
      }
    });

    it('READ: 12 scattered 1 MiB pieces come back into local GPU memory', async () => {
      await pair.target.request('fillDevice', { region: pair.remote, seed: SEED_REMOTE });
      const remoteBlocks = Array.from({ length: 12 }, (_, i) => ((i * 7 + 2) % 32) * 16);
      const localBlocks = Array.from({ length: 12 }, (_, i) => ((i * 5 + 1) % 32) * 16);
      const p = plan('READ', localBlocks, remoteBlocks, 16);
      await p.post();
      expect(p.copyStrategy).toBe('batch');
      for (let i = 0; i < 12; i++) {
        expect(
          await mismatchesOnGpu(
            pair.device,
            pair.buffer,
            SEED_REMOTE,
            localBlocks[i]! * BLOCK,
            16 * BLOCK,
            remoteBlocks[i]! * BLOCK,
          ),
          `piece ${i}`,
        ).toBe(0);
      }
      await fillPatternOnGpu(pair.device, pair.buffer, SEED_LOCAL);
    });

    it('the notification of a batched WRITE is seen after all its data is on the target GPU', async () => {
      for (let round = 0; round < 3; round++) {
        const dst = 64 + round * 64;
        // 40 x 1-block pieces landing contiguously (not merged: the sources are scattered).
        const src = Array.from({ length: 40 }, (_, i) => (i * 13 + round) % BLOCKS);
        const p = plan(
          'WRITE',
          src,
          Array.from({ length: 40 }, (_, i) => dst + i),
          1,
        );
        expect(p.pieces).toBe(40);
        const note = JSON.stringify({
          batch: round,
          check: {
            region: pair.remote,
            offset: (dst + 39) * BLOCK,
            length: BLOCK,
            seed: SEED_LOCAL,
            base: src[39]! * BLOCK,
          },
        });
        await p.post({ notify: note });
        const event = await pair.target.nextEvent((e) => e.event === 'notification' && e.text === note);
        expect((event as { mismatches?: number }).mismatches, `round ${round}`).toBe(0);
        expect(p.copyStrategy).toBe('batch');
      }
    });
  },
);

// The chunk kernel, forced with TANDEM_CUDA_COPY: unaligned pieces, and a settled kernel plan launched again
// by the posting thread itself.
describe.skipIf(!gate.run).each(pairs.filter(([l, r]) => l !== r || pairs.length === 1).slice(0, 1))(
  'cuda-ipc, the chunk kernel (TANDEM_CUDA_COPY=kernel): initiator on GPU %i, target on GPU %i',
  (localGpu, remoteGpu) => {
    let pair: GpuTransferPair;
    const SEED_LOCAL = 31;
    const SEED_REMOTE = 97;
    beforeAll(async () => {
      pair = await forcedCopyPair('kernel', localGpu, remoteGpu, SEED_LOCAL, SEED_REMOTE);
    });
    afterAll(async () => {
      await pair?.dispose();
    });

    it('a piece of 1 MiB and one of 256 KiB + 48 bytes at odd offsets land whole, and nothing beside them', async () => {
      await pair.target.request('fillDevice', { region: pair.remote, seed: SEED_REMOTE });
      const pieces = [
        { bytes: 16 * BLOCK, src: 3 * BLOCK, dst: 100 * BLOCK },
        { bytes: 4 * BLOCK + 48, src: 40 * BLOCK + 3, dst: 200 * BLOCK + 5 }, // the kernel's byte-wise path
      ];
      const p = pair.agent.prepare({
        op: 'WRITE',
        peer: pair.peer.name,
        local: pair.local,
        remote: pair.remote,
        pieces: {
          localOffsets: Float64Array.from(pieces, (x) => x.src),
          remoteOffsets: Float64Array.from(pieces, (x) => x.dst),
          lengths: Float64Array.from(pieces, (x) => x.bytes),
        },
      });
      await p.post();
      expect(p.copyStrategy).toBe('kernel');
      for (const { bytes, src, dst } of pieces) {
        const landed = await pair.target.request<{ mismatches: number }>('checkDevice', {
          region: pair.remote,
          offset: dst,
          length: bytes,
          seed: SEED_LOCAL,
          base: src,
        });
        expect(landed.mismatches, `${bytes} bytes`).toBe(0);
        for (const at of [dst - 16, dst + bytes]) {
          const edge = await pair.target.request<{ mismatches: number }>('checkDevice', {
            region: pair.remote,
            offset: at,
            length: 16,
            seed: SEED_REMOTE,
            base: at,
          });
          expect(edge.mismatches, `${bytes} bytes: the 16 bytes at ${at}`).toBe(0);
        }
      }
    });

    it('a settled kernel plan of 200 scattered blocks is launched by the posting thread; each notification follows its data', async () => {
      const src = Array.from({ length: 200 }, (_, i) => (i * 37 + 11) % BLOCKS);
      const dst = Array.from({ length: 200 }, (_, i) => (i * 101 + 7) % BLOCKS);
      const p = blockPlan(pair.agent, pair.peer.name, pair.local, pair.remote, 'WRITE', src, dst, 1);
      expect(p.pieces).toBe(200);
      await settle(p);
      expect(p.copyStrategy).toBe('kernel');
      const direct = pair.agent.directPosts;
      for (let round = 0; round < 4; round++) {
        await pair.target.request('fillDevice', { region: pair.remote, seed: SEED_REMOTE });
        const note = JSON.stringify({
          kernel: round,
          check: {
            region: pair.remote,
            offset: dst[199]! * BLOCK,
            length: BLOCK,
            seed: SEED_LOCAL,
            base: src[199]! * BLOCK,
          },
        });
        await p.post({ notify: note });
        const event = await pair.target.nextEvent((e) => e.event === 'notification' && e.text === note);
        expect((event as { mismatches?: number }).mismatches, `round ${round}`).toBe(0);
        await expectLanded(pair.target, pair.remote, { src, dst, blocks: 1, seed: SEED_LOCAL }, `round ${round}`);
      }
      expect(pair.agent.directPosts - direct).toBe(4);
    });

    it('a kernel plan launched by the posting thread never overtakes posts queued before it', async () => {
      const onto = Array.from({ length: 32 }, (_, i) => 300 + i);
      const from = (base: number) => Array.from({ length: 32 }, (_, i) => base + ((i * 7) % 32));
      const last = blockPlan(pair.agent, pair.peer.name, pair.local, pair.remote, 'WRITE', from(100), onto, 1);
      await settle(last);
      const direct = pair.agent.directPosts;
      for (let round = 0; round < 3; round++) {
        // Fresh plans (their first posts go through the agent's thread) onto the same blocks, then the settled one.
        const queued = Array.from({ length: 6 }, (_, k) =>
          blockPlan(pair.agent, pair.peer.name, pair.local, pair.remote, 'WRITE', from(k * 32), onto, 1),
        );
        await Promise.all([...queued.map((q) => q.post()), last.post()]);
        await expectLanded(
          pair.target,
          pair.remote,
          { src: from(100), dst: onto, blocks: 1, seed: SEED_LOCAL },
          `round ${round}: the last post landed last`,
        );
      }
      // With posts queued ahead, the settled plan went through the agent's thread; alone, it is launched here.
      expect(pair.agent.directPosts - direct).toBe(0);
      await last.post();
      expect(pair.agent.directPosts - direct).toBe(1);
    });
  },
);

describe.skipIf(!gate.run)('cuda-ipc to a polling target, a sender killed with a notification pending', () => {
  // What must hold whatever the GPU layout (the copies may outlast the kill, between two GPUs over NVLink, or
  // be done before it, within one H100 at ~1.5 TB/s): the target survives, gives up a record whose copy was
  // cut off, still delivers what the sender wrote after it, never announces a WRITE before its data is in
  // place, and never reorders what one sender sent.
  it('the target gives the pending record up (or delivers it, after its data) and still delivers what came after it', async () => {
    const GiB = 1 << 30;
    const targetGpu = gate.caps.cuda.devices.length >= 2 ? 1 : 0;
    const agent = await TransferAgent.create({ name: 'pending-target', notifications: 'poll' });
    const device = await CudaDevice.open(targetGpu);
    const buffer = await device.alloc(GiB);
    const sender = await PeerProcess.start();
    let again: PeerProcess | undefined;
    try {
      const region = agent.registerDevice(buffer);
      await sender.request('create', { name: 'pending-sender' });
      const src = (await sender.request<{ region: { id: number } }>('allocDevice', { device: 0, bytes: GiB, seed: 3 }))
        .region.id;
      await sender.request('load', { metadata: Buffer.from(agent.metadata()).toString('base64') });
      agent.loadRemote(Buffer.from((await sender.request<{ metadata: string }>('metadata')).metadata, 'base64'));
      /** Takes notifications until one reads `text` (or `ms` pass); all the texts taken, in order. */
      const takeUntil = async (text: string, ms: number) => {
        const texts: string[] = [];
        const deadline = Date.now() + ms;
        while (!texts.includes(text) && Date.now() < deadline) {
          texts.push(...agent.takeNotifications().map((n) => n.message.toString()));
          await new Promise((r) => setTimeout(r, 1));
        }
        return texts;
      };
      const common = { peer: 'pending-target', local: src, remote: region.id };
      // Connects, maps the ring, settles the plan's copies.
      await sender.request('post', {
        ...common,
        op: 'WRITE',
        localOffsets: [0],
        remoteOffsets: [0],
        length: 1 << 20,
        notify: 'warm',
      });
      expect(await takeUntil('warm', 10_000)).toEqual(['warm']);
      // Another pattern everywhere, so that the data of an announced WRITE can be told from what was there.
      await fillPatternOnGpu(device, buffer, 5);
      // 32 x 1 GiB queued (about 90 ms of copying on NVLink, ~45 ms within one H100), the last one's
      // notification pending in the ring, then a plain notification behind it; then the sender dies, most
      // often with copies still running, but on a fast enough GPU maybe after the last one.
      await sender.request('postQueued', { ...common, count: 32, length: GiB, notify: 'write-last', after: 'after' });
      await sender.kill();
      const taken = await takeUntil('after', 10_000);
      expect(taken, 'the notification behind the pending one is delivered once the sender is gone').toContain('after');
      expect(
        taken.filter((t) => t !== 'write-last' && t !== 'after'),
        'nothing else arrives',
      ).toEqual([]);
      expect(taken.filter((t) => t === 'write-last').length, 'nothing is announced twice').toBeLessThanOrEqual(1);
      if (taken.includes('write-last')) {
        // The copies finished before the sender died: announced in order, with every byte of it in place.
        expect(taken.indexOf('write-last'), "one sender's order holds").toBeLessThan(taken.indexOf('after'));
        expect(await mismatchesOnGpu(device, buffer, 3, 0, GiB, 0), 'the announced WRITE landed').toBe(0);
      }
      expect(agent.takeNotifications()).toEqual([]);
      // The target is healthy: a new sender reaches it, and its WRITE is announced after its data.
      again = await PeerProcess.start();
      await again.request('create', { name: 'pending-sender-2' });
      const src2 = (
        await again.request<{ region: { id: number } }>('allocDevice', { device: 0, bytes: 1 << 20, seed: 11 })
      ).region.id;
      await again.request('load', { metadata: Buffer.from(agent.metadata()).toString('base64') });
      agent.loadRemote(Buffer.from((await again.request<{ metadata: string }>('metadata')).metadata, 'base64'));
      await again.request('post', {
        peer: 'pending-target',
        local: src2,
        remote: region.id,
        op: 'WRITE',
        localOffsets: [0],
        remoteOffsets: [0],
        length: 1 << 20,
        notify: 'again',
      });
      expect(await takeUntil('again', 10_000)).toEqual(['again']);
      expect(await mismatchesOnGpu(device, buffer, 11, 0, 1 << 20, 0)).toBe(0);
    } finally {
      await sender.kill();
      await again?.stop();
      await agent.dispose();
      await device.dispose();
    }
  });
});

describe.skipIf(!gate.run)('cuda-ipc: GPU memory of a peer that is removed, or of a region it frees', () => {
  it('is given back once this process lets go of it (the peer removed, or the region gone), not held until dispose', async () => {
    const remoteGpu = gate.caps.cuda.devices.length >= 2 ? 1 : 0;
    const GiB = 1 << 30;
    const pair = await gpuTransferPair({
      name: 'release',
      localGpu: 0,
      remoteGpu,
      bytes: 2 * GiB,
      seedLocal: 1,
      seedRemote: 2,
    });
    try {
      const { agent, local, target } = pair;
      const freeBytes = async () =>
        (await target.request<{ freeBytes: number }>('memoryInfo', { device: remoteGpu })).freeBytes;
      /** Frees the target's region and waits (bounded) until its 2 GiB are back on the GPU. */
      const freedAndBack = async (region: number, before: number) => {
        let free = (await target.request<{ freeBytes: number }>('freeDevice', { region })).freeBytes;
        for (let i = 0; i < 500 && free - before < 1.5 * GiB; i++) {
          await new Promise((r) => setTimeout(r, 10));
          free = await freeBytes();
        }
        return free - before;
      };
      // One write opens the target's region in this process (CUDA IPC); a second is issued by this thread.
      const one = { localOffsets: Float64Array.of(0), remoteOffsets: Float64Array.of(0), lengths: 64 << 10 };
      const opened = async (remote: number) => {
        const plan = agent.prepare({ op: 'WRITE', peer: pair.peer.name, local, remote, pieces: one });
        await plan.post();
        await plan.post();
        return plan;
      };

      // The peer removed: our handles close, so the region's memory returns as soon as the target frees it.
      const plan = await opened(pair.remote);
      expect(agent.removeRemote(pair.peer.name)).toBe(true);
      await expect(plan.post()).rejects.toBeInstanceOf(RemoteDisconnectError);
      expect(
        await freedAndBack(pair.remote, await freeBytes()),
        'given back after removeRemote',
      ).toBeGreaterThanOrEqual(1.5 * GiB);

      // A region the target frees while we have it open: the target says it is gone, we close our handle.
      const second = (
        await target.request<{ region: { id: number } }>('allocDevice', { device: remoteGpu, bytes: 2 * GiB })
      ).region.id;
      pair.peer = agent.loadRemote(
        Buffer.from((await target.request<{ metadata: string }>('metadata')).metadata, 'base64'),
      );
      const plan2 = await opened(second);
      expect(
        await freedAndBack(second, await freeBytes()),
        'given back once the region is gone here',
      ).toBeGreaterThanOrEqual(1.5 * GiB);
      await expect(plan2.post()).rejects.toBeInstanceOf(RemoteRegionGoneError);
    } finally {
      await pair.dispose();
    }
  });
});

describe.skipIf(!gate.run).each(pairs.filter(([l, r]) => l === 0 || r === 0).slice(0, 2))(
  'cuda-ipc to a target that polls its notifications: initiator on GPU %i, target on GPU %i',
  (localGpu, remoteGpu) => {
    /** A pair whose target polls; the initiator's blocks are seeded with `seed`. */
    const pollingPair = (name: string, seed: number) =>
      gpuTransferPair({
        name: `${name}-${localGpu}-${remoteGpu}`,
        localGpu,
        remoteGpu,
        bytes: BLOCK * 64,
        seedLocal: seed,
        seedRemote: seed + 1,
        notifications: 'poll',
      });
    /** What the target checks on its GPU when it takes a notification: 4 blocks at `dst` hold ours from `src`. */
    const blockCheck = (remote: number, dst: number, src: number, seed: number) => ({
      region: remote,
      offset: dst * BLOCK,
      length: 4 * BLOCK,
      seed,
      base: src * BLOCK,
    });

    it('each notification is taken after its data is on the target GPU, in order, direct or queued', async () => {
      const pair = await pollingPair('poll', 21);
      try {
        const { agent, local, peer, remote, target } = pair;
        const plan = (dst: number, src: number) => blockWrite(agent, peer.name, local, remote, dst, src, 4);
        const notes: string[] = [];
        const note = (round: number, dst: number, src: number) => {
          const text = JSON.stringify({ round, check: blockCheck(remote, dst, src, 21) });
          notes.push(text);
          return text;
        };
        // Posted again and awaited: issued by this thread. Then a burst: queued for the agent's thread.
        const again = plan(8, 0);
        await settle(again);
        const direct = agent.directPosts;
        const committed = agent.streamCommits;
        for (let round = 0; round < 4; round++) await again.post({ notify: note(round, 8, 0) });
        expect(agent.directPosts - direct).toBe(4);
        await Promise.all(
          Array.from({ length: 6 }, (_, i) => plan(16 + 4 * i, 4 * i).post({ notify: note(4 + i, 16 + 4 * i, 4 * i) })),
        );
        // Every one of them was committed by the GPU stream after its copy, none by a host thread.
        expect(agent.streamCommits - committed).toBe(notes.length);
        const taken = await takeAll(target, notes.length);
        expect(taken.map((t) => t.text)).toEqual(notes);
        expect(taken.map((t) => t.mismatches)).toEqual(notes.map(() => 0));
        expect(taken.every((t) => t.from === agent.name)).toBe(true);
      } finally {
        await pair.dispose();
      }
    });

    it('keeps post order between WRITE notifications and plain ones, in the ring or, when it is full, the socket', async () => {
      const pair = await pollingPair('poll-order', 23);
      try {
        const { agent, local, peer, remote, target } = pair;
        const write = blockWrite(agent, peer.name, local, remote, 8, 0, 4);
        await write.post(); // settles the plan's strategy: later posts go straight to the stream
        const expected: string[] = [];
        const sent: Promise<void>[] = [];
        const plain = (text: string) => {
          expected.push(text);
          sent.push(agent.notify(peer.name, text));
        };
        const written = (round: number) => {
          const text = JSON.stringify({ round, check: blockCheck(remote, 8, 0, 23) });
          expected.push(text);
          sent.push(write.post({ notify: text }));
        };
        // Neither side waits between posts: a plain notification posted after a WRITE must not overtake
        // the WRITE's, which the stream commits only once the copy is done.
        for (let round = 0; round < 6; round++) {
          written(round);
          plain(`plain ${round}`);
        }
        await Promise.all(sent.splice(0));
        // The target has not read: fill its 1 MiB ring with 200 KiB notifications, so that what follows
        // overflows to the socket, a WRITE's notification among them, then one that fits the ring again.
        for (let i = 0; i < 6; i++) plain(`filler ${i} `.padEnd(200 << 10, String(i)));
        written(100);
        plain('after the WRITE');
        written(101);
        await Promise.all(sent.splice(0));
        const taken = await takeAll(target, expected.length);
        expect(taken.map((t) => t.text)).toEqual(expected);
        for (const t of taken) if (t.text.startsWith('{')) expect(t.mismatches, t.text).toBe(0);
      } finally {
        await pair.dispose();
      }
    });
  },
);

/** Takes `count` notifications from a polling target (polled every 5 ms, at most 200 times). */
async function takeAll(target: GpuTransferPair['target'], count: number) {
  const taken: { text: string; mismatches?: number; from: string }[] = [];
  for (let i = 0; i < 200 && taken.length < count; i++) {
    const { notifications } = await target.request<{ notifications: typeof taken }>('take');
    taken.push(...notifications);
    if (taken.length < count) await new Promise((r) => setTimeout(r, 5));
  }
  return taken;
}

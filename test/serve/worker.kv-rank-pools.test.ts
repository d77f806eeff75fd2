/**
 * A prefill worker writes its KV into a decode worker whose tensor-parallel ranks each keep their own pool (a GPU
 * engine's registration lists them: `kvRanks`, a region and a lib/kv rank pool per rank): one transfer plan over
 * every rank's region, each rank getting its kv heads (kvRankTransferPieces). On CPU: a real prefill worker
 * (openWorker, dummy:tiny, its pool in shared memory) and, as the decode side, a transfer agent holding two fp32 rank
 * pools in two shared regions, as a TP 2 GPU worker holds its two bf16 ones. What lands in each rank pool is checked
 * against the KV a single CPU runner computes for the same prompt. Everything in-process; bounded waits.
 */
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { CpuModelRunner } from '../../lib/engine/cpu.js';
import { dummyConfig } from '../../lib/engine/model/dummy.js';
import { kvBlockOffset, kvPool, type KvPoolSpec } from '../../lib/kv/index.js';
import { decodePrefillNotice, type FromWorker, type WorkerRegistration } from '../../lib/worker/protocol.js';
import { openWorker, type Worker } from '../../lib/worker/worker.js';
import { TransferAgent, type Region } from '../../lib/transfer/index.js';
import { EmbeddedControlPlane } from '../../lib/control/index.js';

const MODEL = 'dummy:tiny'; // 2 layers, 2 kv heads of 16
const config = dummyConfig(MODEL);
const BLOCK = 16;
const PROMPT = Array.from({ length: 40 }, (_, i) => (i * 37 + 11) % 250); // 3 blocks, the last one partial
const DST_BLOCKS = [5, 2, 7];

const rankPool = (tpRank: number): KvPoolSpec => ({
  layers: config.numLayers,
  kvHeads: config.numKvHeads,
  headDim: config.headDim,
  blockSize: BLOCK,
  numBlocks: 8,
  dtype: 'fp32',
  layout: 'block-major',
  headLayout: 'NHD',
  tpSize: 2,
  tpRank,
});

describe('a prefill worker writing into a TP 2 decode worker of rank pools', () => {
  let worker: Worker;
  let decode: TransferAgent;
  let regions: Region[];
  const controlPlane = new EmbeddedControlPlane(60_000, 120_000);
  const messages: FromWorker[] = [];

  beforeAll(async () => {
    worker = await openWorker(
      {
        name: 'prefill-0',
        pool: 'prefill',
        role: 'prefill',
        model: MODEL,
        device: 'cpu',
        seed: 0,
        blockSize: BLOCK,
        numBlocks: 32,
        threads: 1,
        heartbeatMs: 60_000,
      },
      (m) => messages.push(m),
      controlPlane,
    );
    decode = await TransferAgent.create({ name: `decode-tp2-${process.pid}` });
    regions = [0, 1].map((r) => decode.allocShared(kvPool(rankPool(r)).poolBytes));
  }, 60_000);

  afterAll(async () => {
    await worker?.dispose();
    await decode?.dispose();
    await controlPlane.close();
  });

  it('each rank pool gets its kv head of every block, one plan, then the notice', async () => {
    const registration: WorkerRegistration = {
      name: 'decode-0',
      role: 'decode',
      pid: process.pid,
      agentName: decode.name,
      agentMetadata: decode.metadata(),
      kvRegion: regions[0]!.id,
      kvPool: rankPool(0),
      kvRanks: regions.map((region, r) => ({ region: region.id, pool: rankPool(r) })),
      device: 'cpu',
      numBlocks: 8,
    };
    decode.loadRemote(worker.registration().agentMetadata);
    await controlPlane.register(registration); // the worker learns its peer from the control plane
    const notice = decode.waitForNotification({ timeoutMs: 30_000 });
    worker.handle({
      type: 'prefill',
      requestId: 'r1',
      promptIds: PROMPT,
      sampling: { temperature: 0, maxTokens: 4 },
      target: { worker: 'decode-0', blockIds: DST_BLOCKS, cachedTokens: 0 },
    });
    const { message } = await notice;
    expect(decodePrefillNotice(message).requestId).toBe('r1');
    // prefillDone follows once the post has resolved.
    const done = await vi.waitFor(
      () => {
        const m = messages.find((x) => x.type === 'prefillDone');
        expect(m, JSON.stringify(messages)).toBeDefined();
        return m!;
      },
      { timeout: 10_000, interval: 10 },
    );
    expect(done).toMatchObject({ type: 'prefillDone', requestId: 'r1', ok: true });
    // Both ranks' heads: 3 blocks x 2 layers x K, V x 16 tokens x 2 heads x 16 dims x 4 bytes.
    expect((done as { bytes: number }).bytes).toBe(3 * 2 * 2 * BLOCK * 2 * 16 * 4);

    // The same prompt through one CPU runner: its pool holds every head of blocks 0..2.
    const runner = await CpuModelRunner.create({ config, numBlocks: 3, threads: 1, weights: MODEL });
    try {
      await runner.forward({
        tokens: Int32Array.from(PROMPT),
        positions: Int32Array.from(PROMPT, (_, i) => i),
        seqStarts: Int32Array.of(0, PROMPT.length),
        blockTables: Int32Array.of(0, 1, 2),
        maxBlocksPerSeq: 3,
        contextLens: Int32Array.of(PROMPT.length),
      });
      const whole = runner.kvPool;
      const wholeF32 = new Float32Array(runner.kvBuffer.buffer, runner.kvBuffer.byteOffset, whole.poolBytes / 4);
      const hd = config.headDim;
      for (let r = 0; r < 2; r++) {
        const pool = kvPool(rankPool(r));
        const view = regions[r]!.view!;
        const rank = new Float32Array(view.buffer, view.byteOffset, pool.poolBytes / 4);
        DST_BLOCKS.forEach((dst, src) => {
          for (let layer = 0; layer < config.numLayers; layer++)
            for (const kv of [0, 1] as const)
              for (let t = 0; t < PROMPT.length - src * BLOCK && t < BLOCK; t++) {
                // Token t of the tile: the whole pool has both heads in a row, the rank pool its one head.
                const w = kvBlockOffset(whole, src, layer, kv) / 4 + (t * 2 + r) * hd;
                const o = kvBlockOffset(pool, dst, layer, kv) / 4 + t * hd;
                for (let d = 0; d < hd; d++) {
                  const want = wholeF32[w + d]!;
                  expect(want).not.toBe(0);
                  const got = rank[o + d]!;
                  if (Math.abs(got - want) > 1e-5 * Math.max(1, Math.abs(want)))
                    expect.fail(
                      `rank ${r} block ${dst} layer ${layer} kv ${kv} token ${t} dim ${d}: ${got} vs ${want}`,
                    );
                }
              }
        });
      }
    } finally {
      await runner.dispose();
    }
  }, 60_000);
});

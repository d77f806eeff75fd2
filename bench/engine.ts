/**
 * npm run bench:engine [-- --model dummy:<preset>] [-- --device cpu|cuda|auto] [-- --prefill 512,3000]
 *                      [-- --context 512,3072] [-- --prompt N] [-- --batch 1,16,64] [-- --steps N] [-- --threads N]
 *                      [-- --tp N] [-- --pp N] [-- --ep N]
 *                      [-- --sampling device|host] [-- --graphs on|off] [-- --torch auto|off] [-- --quick]
 *                      [-- --json FILE] [-- --svg FILE]          (-- --help lists them with their defaults)
 *                      [-- --profile-case prefill:3000,decode:b64:ctx512]
 *
 * Forward speed of the engine's model runners (lib/engine/cpu.ts, lib/engine/cuda.ts) on one device, against
 * the limits of the same device measured in the same run, and on cuda against PyTorch on the same GPU:
 *   prefill  one sequence of each `--prefill` length in one forward (and, on cuda, 4 sequences of the shortest
 *            in one forward): ms (p50 over repeats), tokens/s, achieved TFLOP/s, and on cuda MFU.
 *   decode   for each context C of `--context` and batch size B of `--batch`: one step of B sequences that
 *            each have C tokens in the KV cache (the new token at position C - 1), timed `--steps` times:
 *            ms/step (p50), tokens/s (B / step time), TFLOP/s, and vsBound = bound time / measured step time.
 *            The KV cache is not prefilled (a step's time does not depend on the values it reads): on cuda the
 *            pool is filled with bf16 0.0115, on cpu it is zeros. On cuda a case whose KV cache does not fit
 *            beside the weights and DEVICE_RESERVE_BYTES is skipped, and the table says so.
 *
 * FLOPs: 2 x parameters x tokens (one multiply-add per weight per token), over the parameters a forward
 * multiplies by: every weight but the embedding table (a gather, no FLOPs), plus lm_head (the embedding
 * table again when tied). lm_head runs on the last token of each sequence only (the runners return the
 * last token's logits), so it counts once per sequence, not once per token. Attention's own FLOPs (QK^T and
 * PV, 4 x layers x context x heads x headDim per token) are left out of TFLOP/s and counted in MFU: causal,
 * 4 x layers x heads x headDim x T(T+1)/2 for a prompt of T tokens (2% of an 8B prefill at 512 tokens, 15% at 8192).
 *
 * MFU (cuda): (forward + attention FLOPs) / time, over a GEMM ceiling measured in the same run through the
 * engine's own cuBLAS (timeGemm, native/src/engine/gemm_bench.cpp: bf16 in and out, fp32 accumulation, CUDA
 * events, p50): "MFU" against the model's largest GEMM (the fused gate/up projection of a Llama) with as many
 * rows as the forward has tokens, "MFU 8192" against 8192^3.
 *
 * The decode bound: a decode step of a small batch is bound by memory, reading every weight it multiplies by
 * once (bf16 on cuda, fp32 on cpu) plus the KV cache of every sequence (K and V of all layers, every token in
 * context). The baseline is a copy on the same memory in the same run: on cuda a device-to-device copy of
 * 1 GiB (512 MiB with --quick) on the runner's own GPU (CudaDevice.timeCopy, CUDA events); on cpu 256 MiB
 * of memcpy shared among as many threads as the runner computes on, all copying at once (see cpuBaseline,
 * which also times a read-only scan and uses it where it is faster). Copy GB/s is reported as bench:transfer
 * does, bytes copied / time; a copy reads and writes every byte once, so the memory moves 2 x bytes, and the
 * rate at which it can be read is 2 x copy GB/s (reads and writes share DRAM bandwidth about equally; a
 * GPU's pure-read rate is a little above that, so vsBound near 1.0 on cuda is at the roofline). Hence
 *   bound ms per step = (weight bytes read + KV bytes read) / (2 x copy GB/s)
 * and vsBound = bound ms / measured ms (1.0: at the memory roofline). A mixture-of-experts model (dummy:qwen3-30b-a3b,
 * dummy:mixtral-8x7b) counts only the experts a step reaches, in FLOPs (topK per token) and in the bound (the experts
 * a batch of B reaches under uniform routing, E * (1 - (1 - k/E)^B); bench/engine-moe.ts). The rows also say what the weights
 * alone would allow (weightBoundMs in the JSON). Caveats: on cpu a model small enough to sit in the CPU
 * caches (dummy:tiny) is not bound by DRAM at all, so its vsBound says more about per-step overhead than about
 * bandwidth; with --sampling host (and on cpu) each step also copies nseq x vocab fp32 logits to the host,
 * which is part of the measured time but not of the bound; with --sampling device (the default, what the engine
 * does on a GPU) the step returns greedy token ids from the sampling kernels instead.
 *
 * PyTorch (cuda, where `python3 -c "import torch"` works and torch sees a GPU; otherwise one line says why):
 * after Tandem's rows, with Tandem's device memory freed, bench/engine_torch.py runs the same prefill lengths
 * (batch 1) and decode cases on the same GPU: a plain Llama of the same shape (SDPA with GQA, static KV cache,
 * the decode step captured in a CUDA graph) and, where transformers imports, LlamaForCausalLM with SDPA for the
 * prefill rows. Its times are CUDA-event times of the forward; Tandem's are wall times of a forward call (input
 * upload and result download included), so small gaps at short steps favour PyTorch. "Tandem x" = PyTorch
 * ms / Tandem ms (above 1: Tandem is faster).
 *
 * Parallel layouts (--tp, --pp, --ep; lib/engine/parallel.ts, checked against the model before anything loads: a
 * layout that does not fit, or --ep on cuda, whose engine runs tensor- and pipeline-parallel ranks only, exits 2 with
 * the ParallelLayoutError's message): with more than one rank the same rows run first at one rank (tp = pp = ep = 1) on
 * the same threads (the CPU runner splits --threads between its ranks, at least one each: a layout with more ranks
 * than threads runs more threads; settings.singleRankThreads and the device line say how many) or the same GPU,
 * then at the layout; each row has "1-rank ms" and "speed-up" = 1-rank ms / ms. On CPU ranks each row also has
 * "coll %": rank 0's host time inside collectives (CpuModelRunner.takeCollectiveTime: all-reduces, the logits
 * gather, barriers for replicated kv heads, and on later pipeline stages the wait for the previous stage's
 * activations; each the rank's wait for its peers plus its own summing and copying) over the timed steps' total
 * wall time, and "coll max", the largest share of any rank. On a shared or small host most of that is waiting for
 * a slower peer, not moving bytes. On cuda (--tp, --pp) the ranks share one GPU through the local communicator and
 * stage channel, and "coll %" is rank 0's stream time in its collectives (CudaModelRunner.takeCollectiveTime: CUDA
 * events around each all-reduce and the logits gather, its wait for the other ranks' inputs included) plus, on a
 * later pipeline stage, its host time waiting for the previous stage's micro-batches, over the step time ("coll max":
 * the largest share of any rank, rank = stage x tp + rank in the stage: with --pp a later stage's hand-off wait, the
 * pipeline's fill); the ranks run concurrently on one GPU, so the share says how much of a step the ranks spend
 * meeting, not what NVLink costs.
 *
 * --profile-case CASES (cuda; scripts/profile-engine.sh runs it under ncu --profile-from-start off): no table, no
 * baselines, no PyTorch. The runner loads once for all the cases (`prefill:<tokens>`, one sequence;
 * `decode:b<batch>:ctx<context>`), and each case runs twice as a warm-up (a decode step's CUDA graph is captured
 * there), then once between cuProfilerStart and cuProfilerStop (binding.cudaProfiler, after the device's work is
 * done), so that a profiler records exactly one forward of it: a decode step replayed as a CUDA graph as the engine
 * runs it (ncu needs --graph-profiling node to see its kernels), or issued eagerly with --graphs off. Each case
 * prints one line `profiled <case> ...` on stdout.
 *
 * Prints a header and a table on stdout (progress on stderr); --json FILE writes {host, model, device, config,
 * parallel, params, settings, baseline, gemmCeilings, skipped, torch, rows, and with several ranks singleRankRows};
 * --svg FILE (default: beside the JSON, else bench-results/engine.svg) charts prefill time against prompt length and,
 * one panel per context, decode step time against batch size, for Tandem (and Tandem at one rank), PyTorch and the
 * limits. Unknown presets, bad arguments, a layout that does not fit, or --device cuda without a usable GPU print
 * the error's message and exit 2.
 */
import { spawn, spawnSync } from 'node:child_process';
import { mkdirSync, writeFileSync } from 'node:fs';
import { dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { Worker } from 'node:worker_threads';
import { capabilities } from '../lib/capabilities/index.js';
import { CudaDevice, probeCuda, type DeviceBuffer } from '../lib/cuda/index.js';
import { CpuModelRunner, DEFAULT_DUMMY_SEED, loadWeights, type NamedTensor } from '../lib/engine/cpu.js';
import { CudaModelRunner } from '../lib/engine/cuda.js';
import { checkCudaTensorParallel } from '../lib/engine/cuda-parallel.js';
import { checkCudaPipeline } from '../lib/engine/cuda-pipeline.js';
import { expectedTensors, loadModelConfig, type ModelConfig } from '../lib/engine/model/config.js';
import { dummyConfig, isDummyModel } from '../lib/engine/model/dummy.js';
import { checkParallelConfig, describeParallel, rankCount, SINGLE_RANK } from '../lib/engine/parallel.js';
import type { ForwardBatch, ModelRunner } from '../lib/engine/runner.js';
import { Sampler } from '../lib/engine/sampler.js';
import { loadBinding } from '../lib/native/binding.js';
import { libraryCandidates } from '../lib/native/libraries.js';
import { axisFor, PANEL_HEIGHT, PANEL_WIDTH, panels, writeChart, type ChartSpec } from '../lib/bench/chart.js';
import { formatTable } from '../lib/bench/table.js';
import {
  BackendUnavailableError,
  BadArgumentError,
  ModelConfigError,
  native,
  OutOfMemoryError,
  ParallelLayoutError,
  TandemError,
} from '../lib/errors.js';
import type { GemmTuning, RawCollectiveTime } from '../lib/native/binding.js';
import { activeBodyParams, decodeWeightsRead } from './engine-moe.js';

const BLOCK_SIZE = 16;
const MiB = 2 ** 20;
const GiB = 2 ** 30;

type Device = 'cpu' | 'cuda';

interface Row {
  phase: 'prefill' | 'decode';
  /** Sequences in each forward. */
  batch: number;
  /** Tokens in each forward. */
  tokens: number;
  /** Tokens in each sequence's KV cache at the end of the (last) forward. */
  context: number;
  /** Timed forwards. */
  samples: number;
  msP50: number;
  msMin: number;
  msMax: number;
  tokensPerSec: number;
  tflops: number;
  /** decode: weight + KV bytes one step reads. */
  readBytes?: number;
  /** decode: readBytes / measured step time. */
  readGBps?: number;
  /** decode: readBytes / baseline read rate. */
  boundMs?: number;
  /** decode: the weights' share of the bound alone. */
  weightBoundMs?: number;
  /** decode: boundMs / msP50. */
  vsBound?: number;
  /** prefill: FLOPs of causal attention (QK^T and PV), not in `tflops`. */
  attentionFlops?: number;
  /** prefill on cuda: (forward + attention FLOPs) / time, over the ceiling of the model's largest GEMM at `tokens` rows. */
  mfu?: number;
  /** prefill on cuda: the same over the 8192^3 ceiling. */
  mfu8192?: number;
  /** The same case through PyTorch: the plain Llama of bench/engine_torch.py. */
  torch?: TorchCell;
  /** The same case through transformers' LlamaForCausalLM (prefill rows). */
  transformers?: TorchCell;
  /** A layout of several ranks: the same case at one rank (tp = pp = ep = 1), measured first in the same run. */
  singleRank?: { msP50: number; msMin: number; speedup: number };
  /** A layout of several ranks: their time in collectives over the timed steps (CPU: host time; GPU: stream time). */
  collective?: CollectiveShare;
}

/** Host time CPU ranks spent in collectives (CpuModelRunner.takeCollectiveTime) against the step time. */
interface CollectiveShare {
  /** Rank 0's time in collectives / step time, summed over the timed steps. */
  share: number;
  /** The largest share of any rank, and that rank (stage * group + rank in the stage). */
  maxShare: number;
  maxRank: number;
  /** Per rank, ms per step in each kind of collective (wait for the peers plus summing and copying). */
  ranks: (RawCollectiveTime & { totalMs: number; share: number })[];
}

/** The ranks' collective time over steps that took `stepMs` (ms each) in all, as shares of the step time. */
/**
 * The TANDEM_* variables of the environment (the engine's A/B switches among them: TANDEM_ATTENTION,
 * TANDEM_ELEMENTWISE, ...), recorded with the run; names that look like credentials are left out.
 */
function engineSwitches(env: NodeJS.ProcessEnv): Record<string, string> {
  return Object.fromEntries(
    Object.entries(env)
      .filter(([k, v]) => k.startsWith('TANDEM_') && v !== undefined && !/KEY|TOKEN|SECRET|PASSWORD/.test(k))
      .sort(([a], [b]) => a.localeCompare(b)) as [string, string][],
  );
}

function collectiveShare(times: RawCollectiveTime[], stepMs: number[]): CollectiveShare {
  const steps = stepMs.length;
  const wall = stepMs.reduce((a, b) => a + b, 0);
  const ranks = times.map((t) => {
    const totalMs = t.allReduceMs + t.gatherMs + t.barrierMs + t.handoverMs;
    return {
      allReduceMs: t.allReduceMs / steps,
      gatherMs: t.gatherMs / steps,
      barrierMs: t.barrierMs / steps,
      handoverMs: t.handoverMs / steps,
      totalMs: totalMs / steps,
      share: totalMs / wall,
    };
  });
  const maxRank = ranks.reduce((best, r, i) => (r.share > ranks[best]!.share ? i : best), 0);
  return { share: ranks[0]!.share, maxShare: ranks[maxRank]!.share, maxRank, ranks };
}

interface Baseline {
  what: string;
  bytes: number;
  samples: number;
  /** Time of one copy (p50 on cuda, best on cpu). */
  ms: number;
  /** Bytes copied / time. */
  copyGBps: number;
  /** cpu: bytes read / time of a read-only scan (memchr). */
  scanGBps?: number;
  /** The read rate of the bound: 2 x copyGBps (a copy reads and writes every byte once), or scanGBps if higher. */
  readGBps: number;
  readFrom: '2 x copy' | 'scan';
}

const pct = (sorted: number[], p: number) =>
  sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))]!;

/** A number with about three significant digits, no exponent for the values a benchmark prints. */
function sig(x: number | undefined): string {
  if (x === undefined || !Number.isFinite(x)) return '';
  const a = Math.abs(x);
  if (a >= 100) return x.toFixed(0);
  if (a >= 10) return x.toFixed(1);
  if (a >= 1) return x.toFixed(2);
  if (a >= 0.01) return x.toFixed(3);
  return x === 0 ? '0' : x.toPrecision(2);
}
const human = (b: number) => (b >= GiB ? `${+(b / GiB).toFixed(2)} GiB` : `${+(b / MiB).toFixed(1)} MiB`);
/** Decimal units, as GB/s are. */
const bytesText = (b: number) =>
  b >= 1e9 ? `${sig(b / 1e9)} GB` : b >= 1e6 ? `${sig(b / 1e6)} MB` : `${sig(b / 1e3)} kB`;
const progress = (line: string) => console.error(`bench:engine: ${line}`);

function positiveInt(name: string, text: string): number {
  const n = Number(text);
  if (!Number.isSafeInteger(n) || n < 1)
    throw new BadArgumentError(`--${name} must be a positive integer (got ${text})`);
  return n;
}

/** Parameter counts (elements) of the parts of a model that matter to FLOPs and to bytes read per step. */
function parameterCounts(config: ModelConfig) {
  let total = 0;
  for (const t of expectedTensors(config)) total += t.shape.reduce((a, b) => a * b, 1);
  const embedding = config.vocabSize * config.hiddenSize;
  const lmHead = config.vocabSize * config.hiddenSize; // its own tensor, or the embedding table when tied
  // Every weight applied to every token: the layers and the final norm (no embedding, no lm_head); of an MoE model's
  // experts only the topK a token is routed to (`active`; bench/engine-moe.ts).
  const body = total - embedding - (config.tieWordEmbeddings ? 0 : lmHead);
  const active = activeBodyParams(config, body);
  return { total, embedding, lmHead, body, active, tied: config.tieWordEmbeddings, readPerStep: active + lmHead };
}

/** FLOPs of one forward of `tokens` tokens over `nseq` sequences (see the header: attention left out). */
const forwardFlops = (p: ReturnType<typeof parameterCounts>, tokens: number, nseq: number) =>
  2 * p.active * tokens + 2 * p.lmHead * nseq;

/** A deterministic token of sequence `seq` at `position` (below 256: valid in every vocabulary here). */
const tokenAt = (seq: number, position: number) => (position * 31 + seq * 17 + 7) % 256;

/** KV blocks one sequence of `tokens` tokens needs. */
const blocksFor = (tokens: number) => Math.ceil(tokens / BLOCK_SIZE);

/**
 * Forward batches of the benchmark's shapes. Sequence s of a batch whose sequences hold up to `blocksPerSeq`
 * blocks owns blocks s * blocksPerSeq .. (s + 1) * blocksPerSeq - 1 of the pool.
 */
class Bench {
  constructor(
    private readonly runner: ModelRunner,
    /** 'device': greedy on the runner's device where it can (forwardSampled, what the engine uses); 'host': whole logits back. */
    private readonly sampling: 'device' | 'host' = 'device',
  ) {}

  /** One step as the engine runs it: greedy token ids from the device, or whole logits for host sampling. */
  private step(b: ForwardBatch): Promise<unknown> {
    const nseq = b.seqStarts.length - 1;
    if (this.sampling === 'device' && this.runner.forwardSampled) {
      const greedy = { params: { temperature: 0, topK: 0, topP: 1, seedLo: 0, seedHi: 0 }, counter: 0, logprobs: -1 };
      return this.runner.forwardSampled(b, new Sampler(this.runner.vocabSize).plan(Array(nseq).fill(greedy)));
    }
    return this.runner.forward(b);
  }

  /** Prompts of `count` sequences of `prompt` tokens each, whole, in one forward. */
  prefillBatch(count: number, prompt: number): ForwardBatch {
    const blocksPerSeq = blocksFor(prompt);
    const tokens = new Int32Array(count * prompt);
    const positions = new Int32Array(count * prompt);
    const seqStarts = new Int32Array(count + 1);
    for (let s = 0; s < count; s++) {
      seqStarts[s + 1] = (s + 1) * prompt;
      for (let i = 0; i < prompt; i++) {
        tokens[s * prompt + i] = tokenAt(s, i);
        positions[s * prompt + i] = i;
      }
    }
    return {
      tokens,
      positions,
      seqStarts,
      blockTables: blockTables(count, blocksPerSeq),
      maxBlocksPerSeq: blocksPerSeq,
      contextLens: new Int32Array(count).fill(prompt),
    };
  }

  /**
   * One decode step of `batch` sequences that each have `context` tokens once it is done: the new token at
   * position context - 1, attention over all `context`. Repeating it rewrites the same KV slot, so every
   * timed step reads the same context.
   */
  decodeBatch(batch: number, context: number): ForwardBatch {
    const blocksPerSeq = blocksFor(context);
    return {
      tokens: Int32Array.from({ length: batch }, (_, s) => tokenAt(s, context - 1)),
      positions: new Int32Array(batch).fill(context - 1),
      seqStarts: Int32Array.from({ length: batch + 1 }, (_, s) => s),
      blockTables: blockTables(batch, blocksPerSeq),
      maxBlocksPerSeq: blocksPerSeq,
      contextLens: new Int32Array(batch).fill(context),
    };
  }

  /** Wall times (ms) of `repeats` steps of `batch`, one at a time, sorted. */
  async time(batch: ForwardBatch, repeats: number): Promise<number[]> {
    const ms: number[] = [];
    for (let i = 0; i < repeats; i++) {
      const t0 = performance.now();
      await this.step(batch);
      ms.push(performance.now() - t0);
    }
    return ms.sort((a, b) => a - b);
  }
}

function blockTables(count: number, blocksPerSeq: number): Int32Array {
  return Int32Array.from({ length: count * blocksPerSeq }, (_, i) => i);
}

/**
 * Host memory, from as many threads as the runner computes on (one thread alone cannot draw a server's DRAM
 * bandwidth; the runner's threads together can), each working on its own share of 256 MiB in Buffers of its
 * own, all at once, best of several rounds:
 *   copy  Buffer.copy (glibc memcpy; non-temporal stores at this size, so a copy moves 2 x its bytes)
 *   scan  Buffer.indexOf of a byte that is absent (glibc memchr: reads only)
 * The read rate of the bound is the larger of 2 x copy and scan: glibc's reads are not the CPU's limit (on a
 * 2-vCPU EPYC VM the fp32 runner read llama-3.2-1b at ~1.1x of 2 x copy, and scan was only ~5% above that),
 * so the CPU "roofline" is what plain library code reaches here, not a hard limit; vsBound can pass 1.
 */
async function cpuBaseline(threads: number, quick: boolean): Promise<Baseline> {
  const bytes = 256 * MiB;
  const share = Math.floor(bytes / threads / 4096) * 4096;
  const code = `
    const { parentPort, workerData } = require('node:worker_threads');
    const src = Buffer.alloc(workerData.bytes, 1), dst = Buffer.alloc(workerData.bytes);
    src.copy(dst); // touch every page of both, from this thread
    parentPort.on('message', (op) => {
      if (op === 'copy') src.copy(dst);
      else if (src.indexOf(2) !== -1) throw new Error('scan found a byte that is not there');
      parentPort.postMessage(0);
    });
    parentPort.postMessage(0);`;
  const workers = Array.from({ length: threads }, () => new Worker(code, { eval: true, workerData: { bytes: share } }));
  const reply = (w: Worker) =>
    new Promise<void>((resolve, reject) => {
      const fail = (e: Error) => reject(e);
      w.once('error', fail);
      w.once('message', () => {
        w.off('error', fail);
        resolve();
      });
    });
  const samples = quick ? 4 : 10;
  /** Best time (ms) of `op` on every worker at once. */
  const best = async (op: 'copy' | 'scan') => {
    let ms = Infinity;
    for (let i = 0; i < samples; i++) {
      const t0 = performance.now();
      await Promise.all(
        workers.map((w) => {
          const done = reply(w);
          w.postMessage(op);
          return done;
        }),
      );
      ms = Math.min(ms, performance.now() - t0);
    }
    return ms;
  };
  try {
    await Promise.all(workers.map(reply));
    const copyMs = await best('copy');
    const scanMs = await best('scan');
    const total = share * threads;
    const copyGBps = total / (copyMs * 1e6);
    const scanGBps = total / (scanMs * 1e6);
    return {
      what: `host memory, ${threads} thread${threads > 1 ? 's' : ''} at once (worker threads, best of ${samples})`,
      bytes: total,
      samples,
      ms: copyMs,
      copyGBps,
      scanGBps,
      readGBps: Math.max(2 * copyGBps, scanGBps),
      readFrom: scanGBps > 2 * copyGBps ? 'scan' : '2 x copy',
    };
  } finally {
    await Promise.all(workers.map((w) => w.terminate()));
  }
}

async function cudaBaseline(dev: CudaDevice, quick: boolean): Promise<Baseline> {
  let bytes = quick ? 512 * MiB : GiB;
  // Two buffers of `bytes` next to the model and its KV pool: shrink on a crowded GPU (a 70B model on one card).
  const free = (await dev.memoryInfo()).freeBytes;
  while (bytes > 64 * MiB && 2 * bytes > free / 2) bytes /= 2;
  const buffers: DeviceBuffer[] = [];
  try {
    const src = await dev.alloc(bytes);
    buffers.push(src);
    const dst = await dev.alloc(bytes);
    buffers.push(dst);
    await src.fill(1);
    await dst.fill(0);
    const samples = quick ? 10 : 30;
    const at = (b: DeviceBuffer) => ({ address: b.address, device: dev.ordinal });
    await dev.timeCopy(at(dst), at(src), bytes, 2); // warm-up
    const ms = (await dev.timeCopy(at(dst), at(src), bytes, samples)).sort((a, b) => a - b);
    const p50 = pct(ms, 50);
    const copyGBps = bytes / (p50 * 1e6);
    return {
      what: `device-to-device copy on GPU ${dev.ordinal} (cuMemcpyAsync, CUDA events, p50 of ${samples})`,
      bytes,
      samples,
      ms: p50,
      copyGBps,
      readGBps: 2 * copyGBps,
      readFrom: '2 x copy',
    };
  } finally {
    for (const b of buffers.reverse()) await b.dispose().catch(() => {});
  }
}

/** Weights of `model`, calling `onProgress` after each tensor (the CPU runner has no onProgress of its own). */
function countingWeights(model: string, config: ModelConfig, onProgress: (loaded: number, total: number) => void) {
  const total = expectedTensors(config).length;
  return function* (): Generator<NamedTensor> {
    let loaded = 0;
    for (const t of loadWeights(model, { config, seed: DEFAULT_DUMMY_SEED })) {
      yield t;
      onProgress(++loaded, total);
    }
  };
}

const USAGE = `npm run bench:engine [-- options]
  --model dummy:<preset>|DIR  the model (default dummy:llama-3.2-1b on cuda, dummy:tiny on cpu)
  --device cpu|cuda|auto      where it runs (default auto: cuda when a GPU is there)
  --prefill LIST              prompt lengths of the prefill rows, one sequence each
                              (default cuda 512,1024,3000,8192, --quick 512,3000; cpu 128)
  --context LIST              contexts of the decode rows (default cuda 512,3072,8192, --quick 512,3072; cpu 128)
  --prompt N                  --prefill N --context N
  --batch LIST                batch sizes of the decode rows (default cuda 1,16,64,128, --quick 1,64; cpu 1,4)
  --steps N                   timed decode steps per row (default 32, --quick 16)
  --threads N                 cpu threads (default: the runner's), split between the ranks
  --tp N, --pp N, --ep N      tensor / pipeline / expert parallel ranks (default 1 each; cuda: --tp, --pp); with
                              several ranks the same rows also run at one rank first, for the speed-up, and
                              each row says the ranks' share of the step spent in collectives
  --sampling device|host      greedy ids from the device, or whole logits to the host (default device)
  --graphs on|off             decode steps as CUDA graphs (default on)
  --torch auto|off            PyTorch rows on cuda where python3 imports torch with a GPU (default auto)
  --quick                     fewer rows and samples
  --profile-case LIST         cuda: only one forward of each case (prefill:<tokens>, decode:b<batch>:ctx<context>)
                              between cuProfilerStart and cuProfilerStop, for ncu --profile-from-start off
                              (scripts/profile-engine.sh); may be repeated
  --json FILE                 results as JSON
  --svg FILE                  the chart (default beside --json, else bench-results/engine.svg)
  -h, --help                  this help`;

/** Device memory kept free beside the weights and the KV pool: activations of the longest prefill, cuBLAS, the copy baseline, graphs. */
const DEVICE_RESERVE_BYTES = 8 * GiB;

/** The timed cuBLAS GEMM of the GEMM ceilings (gemm_bench.cpp). */
interface GemmCeiling {
  what: string;
  m: number;
  n: number;
  k: number;
  samples: number;
  msP50: number;
  tflops: number;
}

/** A PyTorch row (bench/engine_torch.py). */
interface TorchRow {
  impl: 'plain' | 'transformers';
  phase: 'prefill' | 'decode';
  batch: number;
  tokens: number;
  context: number;
  samples?: number;
  msP50?: number;
  msMin?: number;
  msMax?: number;
  cudaGraph?: boolean;
  error?: string;
}

interface TorchRun {
  torch: string;
  cudaRuntime: string;
  deviceName: string;
  ceilings: { gemmN: number; gemmMs: number; gemmTflops: number; copyBytes: number; copyMs: number; copyGBps: number };
  transformers: string | null;
  transformersReason?: string;
  rows: TorchRow[];
  seconds: number;
}

/** What a Tandem row says of the same case run through PyTorch. */
interface TorchCell {
  msP50?: number;
  msMin?: number;
  samples?: number;
  /** PyTorch ms / Tandem ms: above 1, Tandem is faster. */
  tandemSpeedup?: number;
  /** prefill: against the same GEMM ceiling as Tandem's row. */
  mfu?: number;
  /** decode: the same memory bound as Tandem's row / PyTorch ms. */
  vsBound?: number;
  error?: string;
}

/** Whether python3 imports torch and torch sees a GPU; why not, in one line, otherwise. */
function probeTorch(): { available: true; version: string } | { available: false; reason: string } {
  const r = spawnSync(
    'python3',
    ['-c', 'import torch; assert torch.cuda.is_available(), "torch sees no CUDA device"; print(torch.__version__)'],
    { encoding: 'utf8', timeout: 120_000 },
  );
  if (r.error) return { available: false, reason: `python3 could not be run (${r.error.message})` };
  if (r.status !== 0)
    return { available: false, reason: `python3 -c "import torch" failed: ${r.stderr.trim().split('\n').pop()}` };
  return { available: true, version: r.stdout.trim().split('\n').pop() ?? '?' };
}

/** Runs bench/engine_torch.py on `cases` (its progress passed through on stderr); rejects with its last error line. */
function runTorch(cases: unknown, timeoutMs: number): Promise<TorchRun> {
  const script = fileURLToPath(new URL('./engine_torch.py', import.meta.url));
  return new Promise((resolve, reject) => {
    const child = spawn('python3', [script], { stdio: ['pipe', 'pipe', 'pipe'] });
    let stdout = '';
    let lastError = '';
    let pending = '';
    let timedOut = false;
    child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
    child.stderr.setEncoding('utf8').on('data', (d: string) => {
      const lines = (pending + d).split('\n');
      pending = lines.pop()!;
      for (const line of lines) {
        if (!line.trim()) continue;
        console.error(
          line.startsWith('engine_torch:') ? `bench:engine: ${line}` : `bench:engine: engine_torch: ${line}`,
        );
        lastError = line;
      }
    });
    const timer = setTimeout(() => {
      timedOut = true;
      child.kill('SIGKILL');
    }, timeoutMs);
    child.on('error', (e) => {
      clearTimeout(timer);
      reject(new Error(`python3 could not be run (${e.message})`));
    });
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      if (pending.trim()) lastError = pending.trim();
      if (timedOut) return reject(new Error(`bench/engine_torch.py took over ${timeoutMs / 1e3} s and was stopped`));
      if (code !== 0)
        return reject(
          new Error(lastError.replace(/^engine_torch: /, '') || `bench/engine_torch.py exited with ${code ?? signal}`),
        );
      try {
        resolve(JSON.parse(stdout.trim().split('\n').pop()!) as TorchRun);
      } catch {
        reject(new Error(`bench/engine_torch.py printed no JSON result (${stdout.length} bytes on stdout)`));
      }
    });
    child.stdin.on('error', () => {}); // a child that exits early: its exit code says why
    child.stdin.end(JSON.stringify(cases));
  });
}

/** The linear layer of `config` with the most weights (the engine fuses QKV and gate/up): N and K of its GEMM. */
function largestGemm(config: ModelConfig): { what: string; n: number; k: number } {
  const h = config.hiddenSize;
  const candidates = [
    { what: 'qkv', n: (config.numHeads + 2 * config.numKvHeads) * config.headDim, k: h },
    { what: 'o', n: h, k: config.numHeads * config.headDim },
    { what: 'gate/up', n: 2 * config.intermediateSize, k: h },
    { what: 'down', n: h, k: config.intermediateSize },
  ];
  return candidates.reduce((best, c) => (c.n * c.k > best.n * best.k ? c : best));
}

/** bf16 GEMM ceilings through the engine's cuBLAS: 8192^3 and the model's largest GEMM at each of `ms` tokens. */
async function gemmCeilings(
  dev: CudaDevice,
  config: ModelConfig,
  ms: number[],
  quick: boolean,
): Promise<GemmCeiling[]> {
  const { binding } = loadBinding();
  const big = largestGemm(config);
  const shapes = [
    { what: '8192^3', m: 8192, n: 8192, k: 8192 },
    ...[...new Set(ms)]
      .sort((a, b) => a - b)
      .map((m) => ({ what: `${big.what} at ${m} tokens`, m, n: big.n, k: big.k })),
  ];
  const out: GemmCeiling[] = [];
  for (const s of shapes) {
    const iterations = quick ? 10 : 20;
    const times = (
      await native(() =>
        binding.timeGemm(dev.raw, {
          m: s.m,
          n: s.n,
          k: s.k,
          iterations,
          warmup: 5,
          cublas: libraryCandidates().cublas,
        }),
      )
    ).sort((a, b) => a - b);
    const msP50 = pct(times, 50);
    out.push({ ...s, samples: iterations, msP50, tflops: (2 * s.m * s.n * s.k) / (msP50 * 1e9) });
    progress(`GEMM ceiling ${s.m} x ${s.n} x ${s.k} (${s.what}): ${sig(msP50)} ms, ${sig(out.at(-1)!.tflops)} TFLOP/s`);
  }
  return out;
}

/** FLOPs of causal attention (QK^T and PV) over `nseq` prompts of `tokens / nseq` tokens each. */
function attentionFlops(config: ModelConfig, tokens: number, nseq: number): number {
  const t = tokens / nseq;
  return 4 * config.numLayers * config.numHeads * config.headDim * nseq * ((t * (t + 1)) / 2);
}

async function main(): Promise<void> {
  const started = performance.now();
  const { values } = parseArgs({
    // `./run bench:engine -- --model ...` (the GPU-host bundle passes its arguments through as they are): the
    // `--` that npm run needs is not an end of options here.
    args: process.argv.slice(2).filter((arg, i) => !(i === 0 && arg === '--')),
    options: {
      model: { type: 'string' },
      device: { type: 'string', default: 'auto' },
      prompt: { type: 'string' },
      prefill: { type: 'string' },
      context: { type: 'string' },
      batch: { type: 'string' },
      steps: { type: 'string' },
      threads: { type: 'string' },
      tp: { type: 'string' },
      pp: { type: 'string' },
      ep: { type: 'string' },
      json: { type: 'string' },
      svg: { type: 'string' },
      quick: { type: 'boolean', default: false },
      sampling: { type: 'string', default: 'device' },
      graphs: { type: 'string', default: 'on' },
      torch: { type: 'string', default: 'auto' },
      'profile-case': { type: 'string', multiple: true },
      help: { type: 'boolean', short: 'h', default: false },
    },
  });
  if (values.help) {
    console.log(USAGE);
    return;
  }
  if (values.graphs !== 'on' && values.graphs !== 'off')
    throw new BadArgumentError(`--graphs must be on or off (got ${values.graphs})`);
  const graphs = values.graphs === 'on';
  if (values.sampling !== 'device' && values.sampling !== 'host')
    throw new BadArgumentError(`--sampling must be device or host (got ${values.sampling})`);
  const sampling = values.sampling;
  if (values.torch !== 'auto' && values.torch !== 'off')
    throw new BadArgumentError(`--torch must be auto or off (got ${values.torch})`);
  const quick = values.quick!;
  const deviceArg = values.device!;
  if (deviceArg !== 'cpu' && deviceArg !== 'cuda' && deviceArg !== 'auto')
    throw new BadArgumentError(`--device must be cpu, cuda or auto (got ${deviceArg})`);
  const list = (name: string, text: string) => [...new Set(text.split(',').map((t) => positiveInt(name, t.trim())))];
  const threads = values.threads === undefined ? undefined : positiveInt('threads', values.threads);
  const prompt0 = values.prompt === undefined ? undefined : positiveInt('prompt', values.prompt);
  const steps0 = values.steps === undefined ? undefined : positiveInt('steps', values.steps);
  const batches0 = values.batch === undefined ? undefined : list('batch', values.batch);
  const prefills0 = values.prefill === undefined ? undefined : list('prefill', values.prefill);
  const contexts0 = values.context === undefined ? undefined : list('context', values.context);
  const profileCases = (values['profile-case'] ?? []).flatMap((text) => text.split(',').map(parseProfileCase));
  // An explicit model is checked before anything native loads (an unknown preset fails fast).
  let config = values.model === undefined ? undefined : modelConfig(values.model);

  const device: Device =
    deviceArg === 'auto' ? ((await probeCuda()).deviceCount > 0 ? 'cuda' : 'cpu') : (deviceArg as Device);
  const cuda = device === 'cuda';
  const model = values.model ?? (cuda ? 'dummy:llama-3.2-1b' : 'dummy:tiny');
  config ??= modelConfig(model);
  // The layout is checked against the model before anything loads (ParallelLayoutError, exit 2).
  const sizes = {
    tp: values.tp === undefined ? 1 : positiveInt('tp', values.tp),
    pp: values.pp === undefined ? 1 : positiveInt('pp', values.pp),
    ep: values.ep === undefined ? 1 : positiveInt('ep', values.ep),
  };
  if (profileCases.length > 0) {
    if (!cuda)
      throw new BadArgumentError(
        '--profile-case profiles the GPU engine: it needs a CUDA device (--device cuda, or auto on a GPU host)',
      );
    if (sizes.tp > 1 || sizes.pp > 1 || sizes.ep > 1)
      throw new BadArgumentError('--profile-case profiles one rank: leave out --tp, --pp and --ep');
    await profile(model, config, profileCases, { graphs, sampling });
    return;
  }
  const where = `--tp ${sizes.tp} --pp ${sizes.pp} --ep ${sizes.ep} on ${model}`;
  const parallel = checkParallelConfig(config, sizes, where);
  if (cuda) {
    if (parallel.ep > 1)
      throw new ParallelLayoutError(
        `${where}: the GPU engine runs tensor- and pipeline-parallel ranks only; --ep runs on the CPU engine (--device cpu)`,
      );
    checkCudaTensorParallel(config, parallel.tp, where);
    if (parallel.pp > 1) checkCudaPipeline(config, parallel.tp, parallel.pp, where);
  }
  const ascending = (xs: number[]) => [...xs].sort((a, b) => a - b);
  const prefills = ascending(
    prefills0 ?? (prompt0 ? [prompt0] : cuda ? (quick ? [512, 3000] : [512, 1024, 3000, 8192]) : [128]),
  );
  const contexts = ascending(
    contexts0 ?? (prompt0 ? [prompt0] : cuda ? (quick ? [512, 3072] : [512, 3072, 8192]) : [128]),
  );
  const batches = ascending(batches0 ?? (cuda ? (quick ? [1, 64] : [1, 16, 64, 128]) : [1, 4]));
  const steps = steps0 ?? (quick ? 16 : 32);
  const prefillRepeats = quick ? 3 : 5;
  const longest = Math.max(...prefills, ...contexts);
  if (longest > config.maxPositionEmbeddings)
    throw new BadArgumentError(
      `a prompt or context of ${longest} tokens exceeds the model's ${config.maxPositionEmbeddings} positions`,
    );
  // Prefill: one sequence per prompt length; on cuda also 4 sequences of the shortest in one forward, where
  // those are short prompts (4 long ones would need more activation memory than DEVICE_RESERVE_BYTES allows).
  const prefillCases = [
    ...prefills.map((tokens) => ({ batch: 1, prompt: tokens })),
    ...(cuda && prefills[0]! <= 1024 ? [{ batch: 4, prompt: prefills[0]! }] : []),
  ];
  let decodeCases = contexts.flatMap((context) => batches.map((batch) => ({ batch, context })));
  const params = parameterCounts(config);
  const dtype = cuda ? 'bf16' : 'fp32';
  const dtypeBytes = cuda ? 2 : 4;
  const kvBytesPerToken = config.numLayers * 2 * config.numKvHeads * config.headDim * dtypeBytes;
  const kvBytesOf = (batch: number, context: number) => batch * blocksFor(context) * BLOCK_SIZE * kvBytesPerToken;

  const torchProbe = !cuda
    ? { available: false as const, reason: 'the PyTorch comparison runs on cuda only, and this run is on the CPU' }
    : config.moe
      ? { available: false as const, reason: "bench/engine_torch.py builds dense Llama models; this one's FFN is MoE" }
      : values.torch === 'off'
        ? { available: false as const, reason: '--torch off' }
        : probeTorch();
  progress(torchProbe.available ? `PyTorch ${torchProbe.version} found` : `no PyTorch rows: ${torchProbe.reason}`);

  const caps = await capabilities();
  const skipped: string[] = [];
  let dev: CudaDevice | undefined;
  let runner: CpuModelRunner | CudaModelRunner | undefined;
  let ceilings: GemmCeiling[] = [];
  let baseline: Baseline | undefined;
  let deviceLine: string;
  let graphsLine = '';
  let weightBytesOnDevice: number | undefined;
  let cudaGraphs: { active: boolean; reason: string | null } | undefined;
  let gemvMaxBatch: number | undefined;
  const rows: Row[] = [];
  /** The same cases at one rank, when the layout has several. */
  const singleRankRows: Row[] = [];
  /** CPU: the one-rank runner's threads (a layout with more ranks than threads runs one thread per rank). */
  let singleRankThreads: number | undefined;
  let layoutLine = describeParallel(config, parallel);
  const weightBytes = params.readPerStep * dtypeBytes;
  let numBlocks = 0;
  try {
    if (cuda) {
      dev = await CudaDevice.open(0);
      const free = (await dev.memoryInfo()).freeBytes;
      const kvBudget = free - params.total * dtypeBytes - DEVICE_RESERVE_BYTES;
      decodeCases = decodeCases.filter(({ batch, context }) => {
        const bytes = kvBytesOf(batch, context);
        if (bytes <= kvBudget) return true;
        skipped.push(
          `decode batch ${batch} at context ${context}: its KV cache (${human(bytes)}) does not fit in the ` +
            `${human(Math.max(0, kvBudget))} left beside the weights and ${human(DEVICE_RESERVE_BYTES)} of working memory`,
        );
        return false;
      });
      ceilings = await gemmCeilings(
        dev,
        config,
        prefillCases.map((c) => c.batch * c.prompt),
        quick,
      );
    }
    numBlocks = Math.max(
      ...prefillCases.map((c) => c.batch * blocksFor(c.prompt)),
      ...decodeCases.map((c) => c.batch * blocksFor(c.context)),
    );
    // The layout's rows, after the same rows at one rank (tp = pp = ep = 1) when the layout has several: the
    // speed-up is against a baseline measured in this run, on the same threads (the CPU runner splits them
    // between its ranks) or the same GPU.
    const layouts = rankCount(parallel) > 1 ? [SINGLE_RANK, parallel] : [parallel];
    for (const layout of layouts) {
      const single = layout === SINGLE_RANK;
      const into = single ? singleRankRows : rows;
      const loadStart = performance.now();
      let lastLine = loadStart;
      // A line a second while loading (the large presets take a while to generate), and one at the end.
      const onProgress = (loaded: number, total: number) => {
        const now = performance.now();
        if (loaded < total && now - lastLine < 1000) return;
        lastLine = now;
        progress(
          `loading ${model} weights: ${loaded}/${total} tensors (${Math.floor((loaded / total) * 100)}%), ` +
            `${((now - loadStart) / 1e3).toFixed(1)} s`,
        );
      };
      const layoutText = describeParallel(config, layout);
      if (dev) {
        progress(
          `${model} on GPU ${dev.ordinal} (${dev.name}), ${layoutText}, ${numBlocks} KV blocks of ${BLOCK_SIZE} tokens`,
        );
        runner = await CudaModelRunner.create({
          config,
          device: dev,
          numBlocks,
          blockSize: BLOCK_SIZE,
          weights: model,
          onProgress,
          cudaGraphs: graphs,
          ...(layout.tp > 1 || layout.pp > 1 ? { parallel: { tp: layout.tp, pp: layout.pp } } : {}),
        });
        // Decode rows read KV that no prompt wrote: bf16 0x3c3c (0.0115) everywhere (every rank's pool), finite
        // whatever the GPU held.
        for (const buffer of runner.kvDeviceBuffers) await buffer.fill(0x3c);
        deviceLine = `cuda:${dev.ordinal} ${dev.name}, bf16 weights and KV, fp32 accumulation`;
        weightBytesOnDevice = runner.weightBytes;
      } else {
        progress(`${model} on the CPU, ${layoutText}, ${numBlocks} KV blocks of ${BLOCK_SIZE} tokens`);
        runner = await CpuModelRunner.create({
          config,
          numBlocks,
          blockSize: BLOCK_SIZE,
          weights: countingWeights(model, config, onProgress),
          ...(threads !== undefined ? { threads } : {}),
          parallel: layout,
        });
        deviceLine = `cpu ${caps.cpu.model}, ${runner.threads} threads, kernel ${runner.kernel}, fp32 weights and KV`;
        if (single) singleRankThreads = runner.threads;
      }
      if (!single) layoutLine = layoutText;
      progress(`loaded in ${((performance.now() - loadStart) / 1e3).toFixed(1)} s`);

      if (baseline === undefined) {
        progress('measuring the memory baseline');
        baseline =
          runner instanceof CpuModelRunner ? await cpuBaseline(runner.threads, quick) : await cudaBaseline(dev!, quick);
        progress(`baseline: ${baselineText(baseline)}`);
      }

      const bench = new Bench(runner, sampling);
      const ranks = rankCount(layout) > 1 ? runner : undefined;
      /** Sorted step times of `repeats` steps, and the ranks' time in collectives over them. */
      const timed = async (batch: ForwardBatch, repeats: number) => {
        await ranks?.takeCollectiveTime(); // drops what the warm-up steps spent (on the GPU: starts the timing)
        const ms = await bench.time(batch, repeats);
        return { ms, collective: ranks && collectiveShare(await ranks.takeCollectiveTime(), ms) };
      };
      const record = (row: Row) => {
        into.push(row);
        progress(
          `${single ? '(one rank) ' : ''}${row.phase} batch ${row.batch} at context ${row.context} ` +
            `(${row.tokens} tokens per forward): ` +
            `${sig(row.msP50)} ms, ${sig(row.tokensPerSec)} tokens/s, ${sig(row.tflops)} TFLOP/s` +
            (row.mfu !== undefined ? `, MFU ${(row.mfu * 100).toFixed(0)}%` : '') +
            (row.vsBound !== undefined ? `, ${(row.vsBound * 100).toFixed(0)}% of the memory bound` : '') +
            (row.collective
              ? `, collectives ${percent(row.collective.share)} of the step on rank 0, ` +
                `${percent(row.collective.maxShare)} on rank ${row.collective.maxRank}`
              : ''),
        );
      };
      /** A row's timing fields from its sorted step times. */
      const timing = (ms: number[]) => ({ samples: ms.length, msP50: pct(ms, 50), msMin: ms[0]!, msMax: ms.at(-1)! });

      // Prefill: whole prompts in one forward, after one untimed forward of the same shape.
      for (const { batch: b, prompt } of prefillCases) {
        const batch = bench.prefillBatch(b, prompt);
        await runner.forward(batch);
        const { ms, collective } = await timed(batch, prefillRepeats);
        const p50 = pct(ms, 50);
        const tokens = b * prompt;
        const flops = forwardFlops(params, tokens, b);
        const attention = attentionFlops(config, tokens, b);
        const ceiling = ceilings.find((c) => c.m === tokens && c.what !== '8192^3');
        const square = ceilings.find((c) => c.what === '8192^3');
        record({
          phase: 'prefill',
          batch: b,
          tokens,
          context: prompt,
          ...timing(ms),
          tokensPerSec: tokens / (p50 / 1e3),
          tflops: flops / (p50 * 1e9),
          attentionFlops: attention,
          ...(ceiling ? { mfu: (flops + attention) / (p50 * 1e9) / ceiling.tflops } : {}),
          ...(square ? { mfu8192: (flops + attention) / (p50 * 1e9) / square.tflops } : {}),
          ...(collective ? { collective } : {}),
        });
      }

      // Decode: every sequence of the batch at the same context, the same step timed `steps` times.
      for (const { batch: b, context } of decodeCases) {
        const batch = bench.decodeBatch(b, context);
        await bench.time(batch, 2); // warm-up (and the CUDA graph's capture)
        const { ms, collective } = await timed(batch, steps);
        const p50 = pct(ms, 50);
        // An MoE model's step reads only the experts its batch reaches (bench/engine-moe.ts); a dense one all weights.
        const stepWeightBytes = decodeWeightsRead(config, params.body, params.lmHead, b) * dtypeBytes;
        const readBytes = stepWeightBytes + b * context * kvBytesPerToken;
        const boundMs = readBytes / (baseline.readGBps * 1e6);
        record({
          phase: 'decode',
          batch: b,
          tokens: b,
          context,
          ...timing(ms),
          tokensPerSec: b / (p50 / 1e3),
          tflops: forwardFlops(params, b, b) / (p50 * 1e9),
          readBytes,
          readGBps: readBytes / (p50 * 1e6),
          boundMs,
          weightBoundMs: stepWeightBytes / (baseline.readGBps * 1e6),
          vsBound: boundMs / p50,
          ...(collective ? { collective } : {}),
        });
      }
      if (runner instanceof CudaModelRunner && !single) {
        cudaGraphs = runner.cudaGraphs;
        gemvMaxBatch = runner.gemvMaxBatch;
        graphsLine = `; decode steps ${
          runner.cudaGraphs.active
            ? 'replayed as CUDA graphs'
            : `issued eagerly${layout.tp > 1 || layout.pp > 1 ? ` (${runner.cudaGraphs.reason ?? 'parallel ranks'})` : runner.cudaGraphs.reason ? ` (graph capture failed: ${runner.cudaGraphs.reason})` : ' (--graphs off)'}`
        }; GEMMs of ${
          runner.gemvMaxBatch > 0
            ? `up to ${runner.gemvMaxBatch} rows through gemv.cu, more`
            : 'any size (TANDEM_GEMV=off)'
        } through ${runner.gemmPath === 'lt' ? 'cuBLASLt (TANDEM_GEMM=lt)' : 'cublasGemmEx (TANDEM_GEMM=gemmex)'}${gemmTuningText(
          runner.gemmTuning,
        )}`;
      }
      // The next layout (or PyTorch) runs on the same device: this one's memory goes back first.
      await runner.dispose();
      runner = undefined;
    }
    for (const row of rows) {
      const one = singleRankRows.find(
        (r) => r.phase === row.phase && r.batch === row.batch && r.context === row.context,
      );
      if (one) row.singleRank = { msP50: one.msP50, msMin: one.msMin, speedup: one.msP50 / row.msP50 };
    }
  } finally {
    // PyTorch runs next on the same GPU: Tandem's memory goes back first.
    await runner?.dispose().catch(() => {});
    await dev?.dispose().catch(() => {});
  }

  // ---------------------------------------------------------------------------------------------------
  let torchRun: TorchRun | undefined;
  let torchReason = torchProbe.available ? undefined : torchProbe.reason;
  if (torchProbe.available) {
    progress(`PyTorch ${torchProbe.version}: the same cases through bench/engine_torch.py`);
    try {
      torchRun = await runTorch(
        {
          model: config,
          prefill: prefills,
          decode: decodeCases,
          warmup: { prefill: 2, decode: 3 },
          repeats: { prefill: prefillRepeats, decode: steps },
          transformers: true,
          ceilings: { gemm: 8192, copyBytes: baseline!.bytes },
          device: 0,
        },
        (quick ? 240 : 420) * 1e3,
      );
    } catch (error) {
      torchReason = `bench/engine_torch.py failed: ${(error as Error).message}`;
      progress(`no PyTorch rows: ${torchReason}`);
    }
  }
  const torchCell = (row: Row, impl: TorchRow['impl']): TorchCell | undefined => {
    const t = torchRun?.rows.find(
      (r) => r.impl === impl && r.phase === row.phase && r.batch === row.batch && r.context === row.context,
    );
    if (!t) return undefined;
    if (t.error !== undefined || t.msP50 === undefined) return { error: t.error ?? 'no time' };
    const flops = row.tflops * row.msP50 * 1e9 + (row.attentionFlops ?? 0);
    const ceiling = ceilings.find((c) => c.m === row.tokens && c.what !== '8192^3');
    return {
      msP50: t.msP50,
      msMin: t.msMin!,
      samples: t.samples!,
      tandemSpeedup: t.msP50 / row.msP50,
      ...(row.phase === 'prefill' && ceiling ? { mfu: flops / (t.msP50 * 1e9) / ceiling.tflops } : {}),
      ...(row.boundMs !== undefined ? { vsBound: row.boundMs / t.msP50 } : {}),
    };
  };
  for (const row of rows) {
    const plain = torchCell(row, 'plain');
    const hf = torchCell(row, 'transformers');
    if (plain) row.torch = plain;
    if (hf) row.transformers = hf;
  }

  const square = ceilings.find((c) => c.what === '8192^3');
  const switches = engineSwitches(process.env);
  const header = [
    `bench:engine  model ${model} (${sig(params.total / 1e6)} M params; ` +
      `${sig(params.readPerStep / 1e6)} M multiplied per token, ` +
      `${bytesText(weightBytes)} of ${dtype} weights read per decode step` +
      (config.moe
        ? ` at batch 1: MoE, ${config.moe.topK} of ${config.moe.numExperts} experts per token; a decode row's ` +
          `bound counts only the experts its batch reaches under uniform routing`
        : '') +
      ')',
    `device ${deviceLine!}; host ${caps.cpu.cores} cores, ${sig(caps.cpu.memoryBytes / GiB)} GiB` +
      (cuda ? `; GPU memory bandwidth (theoretical) ${sig(caps.cuda.devices[0]?.memoryBandwidthGBps)} GB/s` : ''),
    ...(Object.keys(switches).length
      ? [
          `switches ${Object.entries(switches)
            .map(([k, v]) => `${k}=${v}`)
            .join(' ')} (from the environment)`,
        ]
      : []),
    `layout ${layoutLine}` +
      (rankCount(parallel) > 1
        ? `; "1-rank ms" = the same rows at one rank (tp 1, pp 1, ep 1) on the same ` +
          `${cuda ? 'GPU' : `host, ${singleRankThreads} threads`}, measured first in this run; ` +
          `"speed-up" = 1-rank ms / ms` +
          (cuda
            ? `; "coll %" = rank 0's stream time in collectives (all-reduce, logits gather; CUDA events around ` +
              `each, its wait for the other ranks included)` +
              (parallel.pp > 1 ? ` and host time waiting for the previous pipeline stage's micro-batches` : '') +
              ` / step time, "coll max" = the largest of any rank` +
              (parallel.pp > 1 ? ` (rank = stage x ${parallel.tp} + rank in the stage)` : '')
            : `; "coll %" = rank 0's host time in collectives (all-reduce, logits gather, barriers, waiting for ` +
              `the previous stage) / step time, "coll max" = the largest of any rank (rank = stage x ` +
              `${Math.max(parallel.tp, parallel.ep)} + rank in the stage)`)
        : ''),
    `baseline ${baselineText(baseline!)}`,
    `bound ms = (weights + KV read per decode step) / ${sig(baseline!.readGBps)} GB/s; ` +
      `"% bound" = bound / measured (100% = at the memory roofline)`,
    `TFLOP/s = 2 x params x tokens (lm_head once per sequence; attention's own FLOPs left out)`,
    ...(square
      ? [
          `GEMM ceilings (cuBLAS bf16, this run): ${ceilings.map((c) => `${c.m}x${c.n}x${c.k} ${sig(c.tflops)}`).join(', ')} TFLOP/s; ` +
            `MFU = (TFLOP/s + causal attention) / the model's largest GEMM (${largestGemm(config).what}) at the row's tokens; ` +
            `MFU 8192 = the same / ${sig(square.tflops)} TFLOP/s (8192^3)`,
        ]
      : []),
    `prefill ${prefills.join(', ')} tokens (${prefillRepeats} timed); decode at context ${contexts.join(', ')}, ` +
      `${steps} timed steps per row, KV blocks of ${BLOCK_SIZE} tokens${quick ? ', --quick' : ''}; ` +
      (sampling === 'device' && cuda
        ? 'greedy token ids from the device (--sampling device)'
        : 'whole logits back to the host each step (--sampling host)') +
      graphsLine,
    torchRun
      ? `PyTorch ${torchRun.torch} (CUDA ${torchRun.cudaRuntime}) on ${torchRun.deviceName}, same GPU after Tandem, ` +
        `bench/engine_torch.py: "torch" = plain Llama, SDPA (GQA), static KV cache, decode step as a CUDA graph; ` +
        `"HF" = transformers ${torchRun.transformers ?? '(none)'} LlamaForCausalLM, SDPA, prefill only` +
        (torchRun.transformersReason ? ` (${torchRun.transformersReason})` : '') +
        `; "Tandem x" = torch ms / Tandem ms; "torch %" = MFU (prefill) or % bound (decode); ` +
        `PyTorch's own ceilings: bf16 GEMM ${torchRun.ceilings.gemmN}^3 ${sig(torchRun.ceilings.gemmTflops)} TFLOP/s, ` +
        `copy ${sig(torchRun.ceilings.copyGBps)} GB/s`
      : `no PyTorch rows: ${torchReason}`,
  ];
  console.log(header.join('\n'));
  printTable(rows);
  for (const line of skipped) console.log(`skipped: ${line}`);

  const seconds = (performance.now() - started) / 1e3;
  if (values.json) {
    mkdirSync(dirname(values.json), { recursive: true });
    writeFileSync(
      values.json,
      JSON.stringify(
        {
          host: caps,
          quick,
          seconds,
          model,
          device: {
            kind: device,
            description: deviceLine!,
            dtype,
            ...(weightBytesOnDevice !== undefined ? { weightBytes: weightBytesOnDevice } : {}),
          },
          config,
          parallel: { ...parallel, ranks: rankCount(parallel), layout: layoutLine },
          params: { ...params, weightBytesReadPerStep: weightBytes, kvBytesPerToken },
          settings: {
            prefill: prefills,
            contexts,
            batches,
            steps,
            prefillCases,
            prefillRepeats,
            blockSize: BLOCK_SIZE,
            numBlocks,
            sampling: sampling === 'device' && cuda ? 'device' : 'host',
            ...(cudaGraphs ? { cudaGraphs } : {}),
            ...(gemvMaxBatch !== undefined ? { gemvMaxBatch } : {}),
            ...(singleRankThreads !== undefined ? { singleRankThreads } : {}),
          },
          environment: switches,
          baseline: baseline!,
          gemmCeilings: ceilings,
          skipped,
          torch: torchRun ? { available: true, ...torchRun } : { available: false, reason: torchReason },
          rows,
          ...(rankCount(parallel) > 1 ? { singleRankRows } : {}),
        },
        null,
        2,
      ) + '\n',
    );
    console.log(`wrote ${values.json}`);
  }
  const svgFile =
    values.svg ?? (values.json ? values.json.replace(/\.json$/, '') + '.svg' : 'bench-results/engine.svg');
  await writeChart(
    svgFile,
    comparisonChart(
      rows,
      `Tandem bench:engine: ${model} on ${cuda ? (torchRun?.deviceName ?? caps.cuda.devices[0]?.name ?? 'GPU 0') : 'the CPU'}` +
        (rankCount(parallel) > 1
          ? `, tp ${parallel.tp} x pp ${parallel.pp}${parallel.ep > 1 ? ` x ep ${parallel.ep}` : ''}`
          : '') +
        (quick ? ' (--quick)' : ''),
      [
        `${deviceLine!}; ${steps} decode steps per row` +
          (torchRun ? `; PyTorch ${torchRun.torch} on the same GPU` : ''),
        ...(rankCount(parallel) > 1 ? [`layout ${layoutLine}; one rank: the same rows at tp 1, pp 1 in this run`] : []),
        `memory bound at ${sig(baseline!.readGBps)} GB/s read (${baseline!.what})` +
          (square ? `; GEMM ceiling ${sig(square.tflops)} TFLOP/s (cuBLAS bf16 8192^3)` : ''),
      ],
    ),
  );
  console.log(`wrote ${svgFile}`);
  console.log(`done in ${((performance.now() - started) / 1e3).toFixed(1)} s`);
}

/** One forward that --profile-case runs under the profiler. */
type ProfileCase = { phase: 'prefill'; tokens: number } | { phase: 'decode'; batch: number; context: number };

const profileCaseText = (c: ProfileCase) =>
  c.phase === 'prefill' ? `prefill:${c.tokens}` : `decode:b${c.batch}:ctx${c.context}`;

/** `prefill:3000` or `decode:b64:ctx512`; BadArgumentError otherwise. */
function parseProfileCase(text: string): ProfileCase {
  const t = text.trim();
  const prefill = /^prefill:(\d+)$/.exec(t);
  const decode = /^decode:b(\d+):ctx(\d+)$/.exec(t);
  const positive = (x: string) => Number.isSafeInteger(Number(x)) && Number(x) > 0;
  if (prefill && positive(prefill[1]!)) return { phase: 'prefill', tokens: Number(prefill[1]) };
  if (decode && positive(decode[1]!) && positive(decode[2]!))
    return { phase: 'decode', batch: Number(decode[1]), context: Number(decode[2]) };
  throw new BadArgumentError(
    `--profile-case must be prefill:<tokens> or decode:b<batch>:ctx<context>, each a positive integer (got '${t}')`,
  );
}

/**
 * --profile-case: the runner loads once; each case runs twice untimed (a decode step's CUDA graph is captured
 * there), then once between cuProfilerStart and cuProfilerStop (see the header).
 */
async function profile(
  model: string,
  config: ModelConfig,
  cases: ProfileCase[],
  options: { graphs: boolean; sampling: 'device' | 'host' },
): Promise<void> {
  const longest = Math.max(...cases.map((c) => (c.phase === 'prefill' ? c.tokens : c.context)));
  if (longest > config.maxPositionEmbeddings)
    throw new BadArgumentError(
      `a profiled case of ${longest} tokens exceeds the model's ${config.maxPositionEmbeddings} positions`,
    );
  const { binding } = loadBinding();
  const numBlocks = Math.max(
    ...cases.map((c) => (c.phase === 'prefill' ? blocksFor(c.tokens) : c.batch * blocksFor(c.context))),
  );
  const dev = await CudaDevice.open(0);
  let runner: CudaModelRunner | undefined;
  try {
    progress(`${model} on GPU ${dev.ordinal} (${dev.name}), ${numBlocks} KV blocks of ${BLOCK_SIZE} tokens`);
    const loadStart = performance.now();
    runner = await CudaModelRunner.create({
      config,
      device: dev,
      numBlocks,
      blockSize: BLOCK_SIZE,
      weights: model,
      cudaGraphs: options.graphs,
    });
    // As the decode rows: KV no prompt wrote, bf16 0x3c3c everywhere.
    await runner.kvDeviceBuffer.fill(0x3c);
    progress(`loaded in ${((performance.now() - loadStart) / 1e3).toFixed(1)} s`);
    const bench = new Bench(runner, options.sampling);
    for (const c of cases) {
      const batch = c.phase === 'prefill' ? bench.prefillBatch(1, c.tokens) : bench.decodeBatch(c.batch, c.context);
      await bench.time(batch, 2); // warm-up, and the decode graph's capture
      await native(() => binding.cudaProfiler(dev.raw, 'start'));
      let ms: number;
      try {
        ms = (await bench.time(batch, 1))[0]!;
      } finally {
        await native(() => binding.cudaProfiler(dev.raw, 'stop'));
      }
      const how =
        c.phase === 'prefill'
          ? 'one prefill forward'
          : runner.cudaGraphs.active
            ? 'one decode step replayed as a CUDA graph'
            : `one decode step issued eagerly${runner.cudaGraphs.reason ? ` (graph capture failed: ${runner.cudaGraphs.reason})` : ' (--graphs off)'}`;
      console.log(`profiled ${profileCaseText(c)}: ${how}, ${sig(ms)} ms wall (under the profiler)`);
    }
  } finally {
    await runner?.dispose().catch(() => {});
    await dev.dispose().catch(() => {});
  }
}

function baselineText(b: Baseline): string {
  return (
    `${b.what}, ${human(b.bytes)}: copy ${sig(b.copyGBps)} GB/s (x 2 = ${sig(2 * b.copyGBps)} GB/s read: ` +
    `a copy reads and writes each byte)` +
    (b.scanGBps !== undefined ? `, read-only scan ${sig(b.scanGBps)} GB/s` : '')
  );
}

function modelConfig(model: string): ModelConfig {
  return isDummyModel(model) ? dummyConfig(model) : loadModelConfig(model);
}

const percent = (x: number | undefined) => (x === undefined ? '' : `${(x * 100).toFixed(0)}%`);

/** What the GPU runner did with its GEMMs: cuBLASLt autotuning and the gate_up GEMM's output type. */
function gemmTuningText(t: GemmTuning): string {
  return (
    `, algorithms ${t.tune ? `autotuned (${t.shapes} shapes in ${t.ms.toFixed(0)} ms)` : "of the heuristic's first (TANDEM_GEMM_TUNE=0 or gemmex)"}` +
    `; gate_up GEMM out in ${t.gateUpBf16 ? 'bf16' : 'fp32 (TANDEM_GATEUP_BF16=0)'}`
  );
}

/** The table on stdout; a column no row has a value in (MFU on cpu, PyTorch where it did not run) is left out. */
function printTable(rows: Row[]) {
  const torchText = (c: TorchCell | undefined) => (c?.error !== undefined ? 'failed' : sig(c?.msP50));
  const columns: [string, (r: Row) => string][] = [
    ['phase', (r) => r.phase],
    ['batch', (r) => String(r.batch)],
    ['tokens', (r) => String(r.tokens)],
    ['context', (r) => String(r.context)],
    ['ms p50', (r) => sig(r.msP50)],
    ['ms min', (r) => sig(r.msMin)],
    ['1-rank ms', (r) => sig(r.singleRank?.msP50)],
    ['speed-up', (r) => (r.singleRank === undefined ? '' : `${r.singleRank.speedup.toFixed(2)}x`)],
    ['coll %', (r) => percent(r.collective?.share)],
    ['coll max', (r) => (r.collective ? `${percent(r.collective.maxShare)} (r${r.collective.maxRank})` : '')],
    ['tokens/s', (r) => sig(r.tokensPerSec)],
    ['TFLOP/s', (r) => sig(r.tflops)],
    ['MFU', (r) => percent(r.mfu)],
    ['MFU 8192', (r) => percent(r.mfu8192)],
    ['read GB/s', (r) => sig(r.readGBps)],
    ['bound ms', (r) => sig(r.boundMs)],
    ['% bound', (r) => percent(r.vsBound)],
    ['torch ms', (r) => torchText(r.torch)],
    ['torch %', (r) => percent(r.torch?.mfu ?? r.torch?.vsBound)],
    ['Tandem x', (r) => (r.torch?.tandemSpeedup === undefined ? '' : `${r.torch.tandemSpeedup.toFixed(2)}x`)],
    ['HF ms', (r) => torchText(r.transformers)],
    [
      'vs HF',
      (r) => (r.transformers?.tandemSpeedup === undefined ? '' : `${r.transformers.tandemSpeedup.toFixed(2)}x`),
    ],
  ];
  const cells = rows.map((r) => columns.map(([, f]) => f(r)));
  const kept = columns.map((_, i) => i < 5 || cells.some((c) => c[i] !== ''));
  const pick = <T>(xs: T[]) => xs.filter((_, i) => kept[i]);
  console.log(
    formatTable(
      pick(columns.map(([h]) => h)),
      cells.map((c) => pick(c)),
    ),
  );
}

/**
 * The chart: prefill time against prompt length (Tandem, PyTorch, transformers, and the time the forward's FLOPs
 * take at the row's GEMM ceiling) and, one panel per context, decode step time against batch size (Tandem,
 * PyTorch, the memory bound).
 */
function comparisonChart(rows: readonly Row[], title: string, subtitle: string[]): ChartSpec {
  const series = [
    { kind: 'Tandem', dash: [1, 0] },
    { kind: 'PyTorch (plain Llama, SDPA, CUDA graph decode)', dash: [1, 0] },
    { kind: 'transformers (SDPA)', dash: [1, 0] },
    { kind: 'at the GEMM ceiling (MFU 100%)', dash: [7, 4] },
    { kind: 'memory bound (weights + KV)', dash: [2, 3] },
    { kind: 'Tandem at one rank (same run)', dash: [4, 2] },
  ];
  // The one-rank series only where the layout has several ranks (it would be an empty legend entry otherwise).
  const shown = rows.some((r) => r.singleRank) ? series : series.slice(0, 5);
  const kinds = shown.map((s) => s.kind);
  const point = (kind: number, x: number, ms: number | undefined) =>
    ms === undefined || !Number.isFinite(ms) ? [] : [{ kind: series[kind]!.kind, x, ms }];
  const prefill = rows.filter((r) => r.phase === 'prefill' && r.batch === 1);
  const encoding = {
    color: {
      field: 'kind',
      type: 'nominal',
      title: null,
      sort: kinds,
      scale: { domain: kinds, scheme: 'tableau10' },
      legend: { symbolType: 'stroke', symbolSize: 700, columns: 2 },
    },
    strokeDash: {
      field: 'kind',
      type: 'nominal',
      title: null,
      sort: kinds,
      scale: { domain: kinds, range: shown.map((s) => s.dash) },
    },
  };
  const panel = (heading: string, xTitle: string, values: { kind: string; x: number; ms: number }[], base: number) => {
    const xs = [...new Set(values.map((v) => v.x))].sort((a, b) => a - b);
    return {
      width: PANEL_WIDTH,
      height: PANEL_HEIGHT,
      title: heading,
      data: { values },
      mark: { type: 'line', point: true },
      encoding: {
        ...encoding,
        x: axisFor('x', xTitle, xs, { base, zero: false, ticks: xs, labelExpr: "format(datum.value, ',d')" }),
        y: axisFor(
          'ms',
          'ms (p50)',
          values.map((v) => v.ms),
        ),
      },
    };
  };
  const specs: ChartSpec[] = [];
  if (prefill.length > 0)
    specs.push(
      panel(
        'Prefill, one sequence',
        'prompt tokens',
        prefill.flatMap((r) => [
          ...point(0, r.tokens, r.msP50),
          ...point(5, r.tokens, r.singleRank?.msP50),
          ...point(1, r.tokens, r.torch?.msP50),
          ...point(2, r.tokens, r.transformers?.msP50),
          ...point(3, r.tokens, r.mfu === undefined ? undefined : r.msP50 * r.mfu),
        ]),
        2,
      ),
    );
  const decode = rows.filter((r) => r.phase === 'decode');
  for (const context of [...new Set(decode.map((r) => r.context))].sort((a, b) => a - b))
    specs.push(
      panel(
        `Decode step at context ${context}`,
        'batch (sequences decoding together)',
        decode
          .filter((r) => r.context === context)
          .flatMap((r) => [
            ...point(0, r.batch, r.msP50),
            ...point(5, r.batch, r.singleRank?.msP50),
            ...point(1, r.batch, r.torch?.msP50),
            ...point(4, r.batch, r.boundMs),
          ]),
        2,
      ),
    );
  return panels({ text: title, subtitle }, specs, 2);
}

try {
  await main();
} catch (error) {
  const usage =
    (error instanceof TypeError && String((error as { code?: unknown }).code).startsWith('ERR_PARSE_ARGS')) ||
    error instanceof ModelConfigError ||
    error instanceof BadArgumentError ||
    error instanceof BackendUnavailableError ||
    error instanceof ParallelLayoutError ||
    error instanceof OutOfMemoryError;
  if (!usage) throw error;
  console.error(`bench:engine: ${error instanceof TandemError ? error.message : (error as Error).message}`);
  process.exitCode = 2;
}

/**
 * npm run bench:engine [-- --model dummy:<preset>] [-- --device cpu|cuda|auto] [-- --prompt N]
 *                      [-- --batch 1,8,32] [-- --steps N] [-- --threads N] [-- --sampling device|host]
 *                      [-- --graphs on|off] [-- --quick] [-- --json FILE] [-- --svg FILE]
 *
 * Forward speed of the engine's model runners (lib/engine/cpu.ts, lib/engine/cuda.ts) on one device, against
 * the memory-bandwidth bound of the same device measured in the same run:
 *   prefill  one sequence of `--prompt` tokens in one forward (and, on cuda, 4 such sequences in one forward):
 *            ms (p50 over repeats), tokens/s, achieved TFLOP/s.
 *   decode   for each batch size B: B sequences with `--prompt` tokens already in the KV cache (prefilled
 *            untimed), then `--steps` single-token steps of the whole batch: ms/step (p50), tokens/s
 *            (B / step time), TFLOP/s, and vsBound = bound time / measured step time.
 *
 * FLOPs: 2 x parameters x tokens (one multiply-add per weight per token), over the parameters a forward
 * multiplies by: every weight but the embedding table (a gather, no FLOPs), plus lm_head (the embedding
 * table again when tied). lm_head runs on the last token of each sequence only (the runners return the
 * last token's logits), so it counts once per sequence, not once per token. Attention's own FLOPs (QK^T and
 * PV, 4 x layers x context x heads x headDim per token) are left out: under 2% at a 512-token prompt on
 * the presets (e.g. llama-3.2-1b: ~17 GFLOP of ~1 TFLOP for one 512-token prefill).
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
 * and vsBound = bound ms / measured ms (1.0: at the memory roofline). The rows also say what the weights
 * alone would allow (weightBoundMs in the JSON). Caveats: on cpu a model small enough to sit in the CPU
 * caches (dummy:tiny) is not bound by DRAM at all, so its vsBound says more about per-step overhead than about
 * bandwidth; with --sampling host (and on cpu) each step also copies nseq x vocab fp32 logits to the host,
 * which is part of the measured time but not of the bound; with --sampling device (the default, what the engine
 * does on a GPU) the step returns greedy token ids from the sampling kernels instead.
 *
 * Prints a header and a table on stdout (progress on stderr); --json FILE writes
 * {host, model, device, config, params, baseline, rows}; --svg FILE (default: beside the JSON, else
 * bench-results/engine.svg) charts decode step time and tokens/s against batch size, measured and at the
 * memory bound. Unknown presets, bad arguments, or --device cuda
 * without a usable GPU print the error's message and exit 2.
 */
import { mkdirSync, writeFileSync } from 'node:fs';
import { dirname } from 'node:path';
import { parseArgs } from 'node:util';
import { Worker } from 'node:worker_threads';
import { capabilities } from '../lib/capabilities/index.js';
import { CudaDevice, probeCuda, type DeviceBuffer } from '../lib/cuda/index.js';
import { CpuModelRunner, DEFAULT_DUMMY_SEED, loadWeights, type NamedTensor } from '../lib/engine/cpu.js';
import { CudaModelRunner } from '../lib/engine/cuda.js';
import { expectedTensors, loadModelConfig, type ModelConfig } from '../lib/engine/model/config.js';
import { dummyConfig, isDummyModel } from '../lib/engine/model/dummy.js';
import type { ForwardBatch, ModelRunner } from '../lib/engine/runner.js';
import { Sampler } from '../lib/engine/sampler.js';
import { engineChart, writeChart } from './chart.js';
import {
  BackendUnavailableError,
  BadArgumentError,
  ModelConfigError,
  OutOfMemoryError,
  TandemError,
} from '../lib/errors.js';

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
  // Every weight applied to every token: the layers and the final norm (no embedding, no lm_head).
  const body = total - embedding - (config.tieWordEmbeddings ? 0 : lmHead);
  return { total, embedding, lmHead, body, tied: config.tieWordEmbeddings, readPerStep: body + lmHead };
}

/** FLOPs of one forward of `tokens` tokens over `nseq` sequences (see the header: attention left out). */
const forwardFlops = (p: ReturnType<typeof parameterCounts>, tokens: number, nseq: number) =>
  2 * p.body * tokens + 2 * p.lmHead * nseq;

/** A deterministic token of sequence `seq` at `position` (below 256: valid in every vocabulary here). */
const tokenAt = (seq: number, position: number) => (position * 31 + seq * 17 + 7) % 256;

class Bench {
  /** Sequences whose prompt is in the KV cache (sequence i owns blocks i*blocksPerSeq .. +blocksPerSeq). */
  private done = 0;

  constructor(
    private readonly runner: ModelRunner,
    private readonly prompt: number,
    private readonly blocksPerSeq: number,
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

  /** Forward of the prompts of sequences first..first+count-1, whole, in one batch. */
  prefillBatch(first: number, count: number): ForwardBatch {
    const { prompt, blocksPerSeq } = this;
    const tokens = new Int32Array(count * prompt);
    const positions = new Int32Array(count * prompt);
    const seqStarts = new Int32Array(count + 1);
    for (let s = 0; s < count; s++) {
      seqStarts[s + 1] = (s + 1) * prompt;
      for (let i = 0; i < prompt; i++) {
        tokens[s * prompt + i] = tokenAt(first + s, i);
        positions[s * prompt + i] = i;
      }
    }
    return {
      tokens,
      positions,
      seqStarts,
      blockTables: this.blockTables(first, count),
      maxBlocksPerSeq: blocksPerSeq,
      contextLens: new Int32Array(count).fill(prompt),
    };
  }

  /** One decode step of sequences 0..batch-1, each at `position`. */
  decodeBatch(batch: number, position: number, blockTables: Int32Array): ForwardBatch {
    return {
      tokens: Int32Array.from({ length: batch }, (_, s) => tokenAt(s, position)),
      positions: new Int32Array(batch).fill(position),
      seqStarts: Int32Array.from({ length: batch + 1 }, (_, s) => s),
      blockTables,
      maxBlocksPerSeq: this.blocksPerSeq,
      contextLens: new Int32Array(batch).fill(position + 1),
    };
  }

  blockTables(first: number, count: number): Int32Array {
    const { blocksPerSeq } = this;
    return Int32Array.from(
      { length: count * blocksPerSeq },
      (_, i) => (first + Math.floor(i / blocksPerSeq)) * blocksPerSeq + (i % blocksPerSeq),
    );
  }

  /** Marks sequences 0..count-1 as prefilled (a timed prefill wrote the same tokens the untimed one would). */
  markPrefilled(count: number) {
    this.done = Math.max(this.done, count);
  }

  /** Untimed: puts the prompt of sequences prefilled..count-1 in the KV cache, whole sequences per forward. */
  async prefillUpTo(count: number, chunkTokens: number) {
    const perForward = Math.max(1, Math.floor(chunkTokens / this.prompt));
    while (this.done < count) {
      const n = Math.min(perForward, count - this.done);
      await this.runner.forward(this.prefillBatch(this.done, n));
      this.done += n;
    }
  }

  /** Sequences 0..prefilled-1 have their prompt in the KV cache. */
  get prefilled(): number {
    return this.done;
  }

  /** Wall times (ms) of `forward` calls, one at a time, sorted. */
  async time(batches: ForwardBatch[]): Promise<number[]> {
    const ms: number[] = [];
    for (const b of batches) {
      const t0 = performance.now();
      await this.step(b);
      ms.push(performance.now() - t0);
    }
    return ms.sort((a, b) => a - b);
  }
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

async function main(): Promise<void> {
  const started = performance.now();
  const { values } = parseArgs({
    options: {
      model: { type: 'string' },
      device: { type: 'string', default: 'auto' },
      prompt: { type: 'string' },
      batch: { type: 'string' },
      steps: { type: 'string' },
      threads: { type: 'string' },
      json: { type: 'string' },
      svg: { type: 'string' },
      quick: { type: 'boolean', default: false },
      sampling: { type: 'string', default: 'device' },
      graphs: { type: 'string', default: 'on' },
    },
  });
  if (values.graphs !== 'on' && values.graphs !== 'off')
    throw new BadArgumentError(`--graphs must be on or off (got ${values.graphs})`);
  const graphs = values.graphs === 'on';
  if (values.sampling !== 'device' && values.sampling !== 'host')
    throw new BadArgumentError(`--sampling must be device or host (got ${values.sampling})`);
  const sampling = values.sampling;
  const quick = values.quick!;
  const deviceArg = values.device!;
  if (deviceArg !== 'cpu' && deviceArg !== 'cuda' && deviceArg !== 'auto')
    throw new BadArgumentError(`--device must be cpu, cuda or auto (got ${deviceArg})`);
  const threads = values.threads === undefined ? undefined : positiveInt('threads', values.threads);
  const prompt0 = values.prompt === undefined ? undefined : positiveInt('prompt', values.prompt);
  const steps0 = values.steps === undefined ? undefined : positiveInt('steps', values.steps);
  const batches0 = values.batch?.split(',').map((b) => positiveInt('batch', b.trim()));
  // An explicit model is checked before anything native loads (an unknown preset fails fast).
  let config = values.model === undefined ? undefined : modelConfig(values.model);

  const device: Device =
    deviceArg === 'auto' ? ((await probeCuda()).deviceCount > 0 ? 'cuda' : 'cpu') : (deviceArg as Device);
  const model = values.model ?? (device === 'cuda' ? 'dummy:llama-3.2-1b' : 'dummy:tiny');
  config ??= modelConfig(model);
  const prompt = prompt0 ?? (device === 'cuda' ? 512 : 128);
  const steps = steps0 ?? (quick ? 16 : 32);
  const batches = batches0 ?? (device === 'cuda' ? (quick ? [1, 32] : [1, 8, 32, 64]) : [1, 4]);
  const prefillBatches = device === 'cuda' ? [1, 4] : [1];
  const prefillRepeats = quick ? 3 : 5;
  if (prompt + steps > config.maxPositionEmbeddings)
    throw new BadArgumentError(
      `--prompt + --steps (${prompt + steps}) exceeds the model's ${config.maxPositionEmbeddings} positions`,
    );
  const maxSeqs = Math.max(...batches, ...prefillBatches);
  const blocksPerSeq = Math.ceil((prompt + steps) / BLOCK_SIZE) + 1;
  const numBlocks = maxSeqs * blocksPerSeq;
  const params = parameterCounts(config);
  const dtype = device === 'cuda' ? 'bf16' : 'fp32';
  const dtypeBytes = device === 'cuda' ? 2 : 4;
  const kvBytesPerToken = config.numLayers * 2 * config.numKvHeads * config.headDim * dtypeBytes;

  const caps = await capabilities();
  let dev: CudaDevice | undefined;
  let runner: CpuModelRunner | CudaModelRunner | undefined;
  try {
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
    let deviceLine: string;
    if (device === 'cuda') {
      dev = await CudaDevice.open(0);
      progress(`${model} on GPU ${dev.ordinal} (${dev.name}), ${numBlocks} KV blocks of ${BLOCK_SIZE} tokens`);
      runner = await CudaModelRunner.create({
        config,
        device: dev,
        numBlocks,
        blockSize: BLOCK_SIZE,
        weights: model,
        onProgress,
        cudaGraphs: graphs,
      });
      deviceLine = `cuda:${dev.ordinal} ${dev.name}, bf16 weights and KV, fp32 accumulation`;
    } else {
      progress(`${model} on the CPU, ${numBlocks} KV blocks of ${BLOCK_SIZE} tokens`);
      runner = await CpuModelRunner.create({
        config,
        numBlocks,
        blockSize: BLOCK_SIZE,
        weights: countingWeights(model, config, onProgress),
        ...(threads !== undefined ? { threads } : {}),
      });
      deviceLine = `cpu ${caps.cpu.model}, ${runner.threads} threads, kernel ${runner.kernel}, fp32 weights and KV`;
    }
    progress(`loaded in ${((performance.now() - loadStart) / 1e3).toFixed(1)} s; measuring the baseline`);

    const baseline =
      runner instanceof CpuModelRunner ? await cpuBaseline(runner.threads, quick) : await cudaBaseline(dev!, quick);
    progress(`baseline: ${baselineText(baseline)}`);

    const bench = new Bench(runner, prompt, blocksPerSeq, sampling);
    const rows: Row[] = [];
    const record = (row: Row) => {
      rows.push(row);
      progress(
        `${row.phase} batch ${row.batch} (${row.tokens} tokens per forward): ${sig(row.msP50)} ms, ` +
          `${sig(row.tokensPerSec)} tokens/s, ${sig(row.tflops)} TFLOP/s` +
          (row.vsBound !== undefined ? `, ${(row.vsBound * 100).toFixed(0)}% of the memory bound` : ''),
      );
    };

    /** A row's timing fields from its sorted step times. */
    const timing = (ms: number[]) => ({ samples: ms.length, msP50: pct(ms, 50), msMin: ms[0]!, msMax: ms.at(-1)! });

    // Prefill: whole prompts in one forward, after one untimed forward of the same shape.
    for (const b of prefillBatches) {
      const batch = bench.prefillBatch(0, b);
      await runner.forward(batch);
      const ms = await bench.time(Array.from({ length: prefillRepeats }, () => batch));
      bench.markPrefilled(b);
      const p50 = pct(ms, 50);
      const tokens = b * prompt;
      record({
        phase: 'prefill',
        batch: b,
        tokens,
        context: prompt,
        ...timing(ms),
        tokensPerSec: tokens / (p50 / 1e3),
        tflops: forwardFlops(params, tokens, b) / (p50 * 1e9),
      });
    }

    // Decode: every sequence of the batch at the same position, steps timed one by one.
    const chunkTokens = Math.max(prompt, device === 'cuda' ? 4096 : 1024);
    const weightBytes = params.readPerStep * dtypeBytes;
    for (const b of [...new Set(batches)].sort((x, y) => x - y)) {
      if (b > bench.prefilled)
        progress(`decode batch ${b}: prefilling ${b - bench.prefilled} more x ${prompt} tokens (untimed)`);
      await bench.prefillUpTo(b, chunkTokens);
      const tables = bench.blockTables(0, b);
      const stepBatches = Array.from({ length: steps }, (_, k) => bench.decodeBatch(b, prompt + k, tables));
      await bench.time(stepBatches.slice(0, Math.min(2, steps))); // warm-up: the first positions, rewritten below
      const ms = await bench.time(stepBatches);
      const p50 = pct(ms, 50);
      // Attention at position p reads p + 1 tokens of K and V; the steps span prompt .. prompt + steps - 1.
      const meanContext = prompt + (steps + 1) / 2;
      const kvBytes = b * meanContext * kvBytesPerToken;
      const readBytes = weightBytes + kvBytes;
      const boundMs = readBytes / (baseline.readGBps * 1e6);
      record({
        phase: 'decode',
        batch: b,
        tokens: b,
        context: prompt + steps,
        ...timing(ms),
        tokensPerSec: b / (p50 / 1e3),
        tflops: forwardFlops(params, b, b) / (p50 * 1e9),
        readBytes,
        readGBps: readBytes / (p50 * 1e6),
        boundMs,
        weightBoundMs: weightBytes / (baseline.readGBps * 1e6),
        vsBound: boundMs / p50,
      });
    }

    // ---------------------------------------------------------------------------------------------------
    const header = [
      `bench:engine  model ${model} (${sig(params.total / 1e6)} M params; ` +
        `${sig(params.readPerStep / 1e6)} M multiplied per token, ` +
        `${bytesText(weightBytes)} of ${dtype} weights read per decode step)`,
      `device ${deviceLine}; host ${caps.cpu.cores} cores, ${sig(caps.cpu.memoryBytes / GiB)} GiB` +
        (dev
          ? `; GPU memory bandwidth (theoretical) ${sig(caps.cuda.devices[dev.ordinal]?.memoryBandwidthGBps)} GB/s`
          : ''),
      `baseline ${baselineText(baseline)}`,
      `bound ms = (weights + KV read per decode step) / ${sig(baseline.readGBps)} GB/s; ` +
        `"% bound" = bound / measured (100% = at the memory roofline)`,
      `TFLOP/s = 2 x params x tokens (lm_head once per sequence; attention's own FLOPs left out)`,
      `prompt ${prompt} tokens, ${steps} decode steps per batch size, ` +
        `KV blocks of ${BLOCK_SIZE} tokens${quick ? ', --quick' : ''}; ` +
        (sampling === 'device' && runner instanceof CudaModelRunner
          ? 'greedy token ids from the device (--sampling device)'
          : 'whole logits back to the host each step (--sampling host)') +
        (runner instanceof CudaModelRunner
          ? `; decode steps ${runner.cudaGraphs.active ? 'replayed as CUDA graphs' : `issued eagerly${runner.cudaGraphs.reason ? ` (graph capture failed: ${runner.cudaGraphs.reason})` : ' (--graphs off)'}`}` +
            `; GEMMs of ${runner.gemvMaxBatch > 0 ? `up to ${runner.gemvMaxBatch} rows through gemv.cu, more` : 'any size (TANDEM_GEMV=off)'} through cuBLAS`
          : ''),
    ];
    console.log(header.join('\n'));
    printTable(rows);

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
              description: deviceLine,
              dtype,
              ...(dev ? { ordinal: dev.ordinal, name: dev.name } : {}),
              ...(runner instanceof CpuModelRunner ? { threads: runner.threads, kernel: runner.kernel } : {}),
              ...(runner instanceof CudaModelRunner ? { weightBytes: runner.weightBytes } : {}),
            },
            config,
            params: { ...params, weightBytesReadPerStep: weightBytes, kvBytesPerToken },
            settings: {
              prompt,
              steps,
              batches,
              prefillBatches,
              prefillRepeats,
              blockSize: BLOCK_SIZE,
              numBlocks,
              sampling: sampling === 'device' && runner instanceof CudaModelRunner ? 'device' : 'host',
              ...(runner instanceof CudaModelRunner
                ? { cudaGraphs: runner.cudaGraphs, gemvMaxBatch: runner.gemvMaxBatch }
                : {}),
            },
            baseline,
            rows,
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
      engineChart(
        rows,
        `Tandem bench:engine: ${model} on ${device === 'cuda' ? dev!.name : 'the CPU'}${quick ? ' (--quick)' : ''}`,
        [
          `${deviceLine}; prompt ${prompt} tokens, ${steps} decode steps per batch size`,
          `memory bound at ${sig(baseline.readGBps)} GB/s read (${baseline.what})` +
            rows
              .filter((r) => r.phase === 'prefill')
              .map((r) => `; prefill x${r.batch}: ${sig(r.msP50)} ms, ${sig(r.tokensPerSec)} tokens/s`)
              .join(''),
        ],
      ),
    );
    console.log(`wrote ${svgFile}`);
    console.log(`done in ${seconds.toFixed(1)} s`);
  } finally {
    await runner?.dispose().catch(() => {});
    await dev?.dispose().catch(() => {});
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

function printTable(rows: Row[]) {
  const columns: [string, (r: Row) => string][] = [
    ['phase', (r) => r.phase],
    ['batch', (r) => String(r.batch)],
    ['tokens', (r) => String(r.tokens)],
    ['context', (r) => String(r.context)],
    ['ms p50', (r) => sig(r.msP50)],
    ['ms min', (r) => sig(r.msMin)],
    ['tokens/s', (r) => sig(r.tokensPerSec)],
    ['TFLOP/s', (r) => sig(r.tflops)],
    ['read GB/s', (r) => sig(r.readGBps)],
    ['bound ms', (r) => sig(r.boundMs)],
    ['% bound', (r) => (r.vsBound === undefined ? '' : `${(r.vsBound * 100).toFixed(0)}%`)],
  ];
  const cells = rows.map((r) => columns.map(([, f]) => f(r)));
  const widths = columns.map(([h], i) => Math.max(h.length, ...cells.map((c) => c[i]!.length)));
  const line = (c: string[]) =>
    c
      .map((s, i) => (i === 0 ? s.padEnd(widths[i]!) : s.padStart(widths[i]!)))
      .join('  ')
      .trimEnd();
  console.log(line(columns.map(([h]) => h)));
  console.log(widths.map((w) => '-'.repeat(w)).join('  '));
  for (const c of cells) console.log(line(c));
}

try {
  await main();
} catch (error) {
  const usage =
    (error instanceof TypeError && String((error as { code?: unknown }).code).startsWith('ERR_PARSE_ARGS')) ||
    error instanceof ModelConfigError ||
    error instanceof BadArgumentError ||
    error instanceof BackendUnavailableError ||
    error instanceof OutOfMemoryError;
  if (!usage) throw error;
  console.error(`bench:engine: ${error instanceof TandemError ? error.message : (error as Error).message}`);
  process.exitCode = 2;
}

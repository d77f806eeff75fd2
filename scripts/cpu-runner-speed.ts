/**
 * Forward speed of the native CPU runner on a dummy model: one prompt prefill, then single-token decode steps.
 *
 *   npx tsx scripts/cpu-runner-speed.ts [dummy:tiny|dummy:llama-3.2-1b|...] [--prompt 128] [--decode 32]
 *                                       [--threads N] [--kernel auto|avx512|avx2|generic] [--repeat 3]
 *
 * Prints the best of --repeat runs for each (prefill tokens/s; decode tokens/s over the decode steps).
 */
import { parseArgs } from 'node:util';
import { CpuModelRunner, type CpuKernel } from '../lib/engine/cpu.js';
import { dummyConfig } from '../lib/engine/model/index.js';

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    prompt: { type: 'string', default: '128' },
    decode: { type: 'string', default: '32' },
    threads: { type: 'string' },
    kernel: { type: 'string', default: 'auto' },
    repeat: { type: 'string', default: '3' },
  },
});
const model = positionals[0] ?? 'dummy:tiny';
const prompt = Number(values.prompt);
const decode = Number(values.decode);
const repeat = Number(values.repeat);
const config = dummyConfig(model);
const blockSize = 16;
const blocksPerSeq = Math.ceil((prompt + decode) / blockSize);

let t = performance.now();
const runner = await CpuModelRunner.create({
  config,
  numBlocks: blocksPerSeq,
  blockSize,
  weights: model,
  kernel: values.kernel as CpuKernel,
  ...(values.threads ? { threads: Number(values.threads) } : {}),
});
console.log(
  `${model}: loaded in ${((performance.now() - t) / 1000).toFixed(1)} s; ${runner.threads} threads, kernel ${runner.kernel}`,
);

const blockTables = Int32Array.from({ length: blocksPerSeq }, (_, i) => i);
const step = (start: number, tokens: number[]) =>
  runner.forward({
    tokens: Int32Array.from(tokens),
    positions: Int32Array.from(tokens, (_, i) => start + i),
    seqStarts: Int32Array.of(0, tokens.length),
    blockTables,
    maxBlocksPerSeq: blocksPerSeq,
    contextLens: Int32Array.of(start + tokens.length),
  });

let bestPrefill = Infinity;
let bestDecode = Infinity;
for (let r = 0; r < repeat; r++) {
  t = performance.now();
  let logits = await step(
    0,
    Array.from({ length: prompt }, (_, i) => (i * 31 + 7) % 256),
  );
  bestPrefill = Math.min(bestPrefill, performance.now() - t);
  t = performance.now();
  for (let i = 0; i < decode; i++) {
    let next = 0;
    for (let v = 1; v < config.vocabSize; v++) if (logits[v]! > logits[next]!) next = v;
    logits = await step(prompt + i, [next]);
  }
  bestDecode = Math.min(bestDecode, performance.now() - t);
}
console.log(
  `prefill ${prompt} tokens: ${bestPrefill.toFixed(1)} ms (${((prompt / bestPrefill) * 1000).toFixed(1)} tokens/s); ` +
    `decode: ${(bestDecode / decode).toFixed(2)} ms/token (${((decode / bestDecode) * 1000).toFixed(1)} tokens/s)`,
);
await runner.dispose();

/**
 * The Tandem side of `npm run bench:start` (bench/start.ts runs it in a fresh process per measurement):
 *
 *   node --import tsx bench/start-tandem.ts DIR cuda|cpu
 *
 * Opens the checkpoint in DIR as a worker of `npm start` does before its /health is ready: `openModel` with a start-up
 * log, then on a GPU the engine warm-up (one forward over a prompt and one decode step; skipped, as by the worker,
 * when TANDEM_WARMUP=0). Timed from the openModel call to ready. Then, untimed, one forward over a short prompt
 * through the model's own tokenizer checks that the logits are finite, and the model is disposed.
 *
 * Prints one JSON line on stdout: {seconds, readyAtMs (the wall clock at ready, for the parent's process time),
 * device, log (every start-up line), warmUpMs, finite, vocabSize}; the start-up lines also go to stderr as they come.
 * A failure: exit 1 with its message as the last line on stderr.
 */
import { CudaModelRunner } from '../lib/engine/cuda.js';
import { openModel } from '../lib/engine/open.js';
import { warmUpRunner, type ForwardBatch } from '../lib/engine/runner.js';

const [dir, device] = process.argv.slice(2);
if (!dir || (device !== 'cuda' && device !== 'cpu')) {
  console.error('start-tandem: usage: start-tandem.ts DIR cuda|cpu');
  process.exit(2);
}

/** Opens, times, checks and disposes the model; the JSON line. */
async function main(dir: string, device: 'cuda' | 'cpu'): Promise<void> {
  const log: string[] = [];
  const t0 = performance.now();
  const opened = await openModel({
    model: dir,
    device,
    log: (line) => {
      log.push(line);
      process.stderr.write(`start-tandem: ${line}\n`);
    },
  });
  let warmUpMs: number | undefined;
  if (opened.runner instanceof CudaModelRunner && process.env.TANDEM_WARMUP !== '0') {
    warmUpMs = await warmUpRunner(opened.runner);
    log.push(`engine warm-up: ${warmUpMs.toFixed(0)} ms`);
  }
  const seconds = (performance.now() - t0) / 1000;
  const readyAtMs = Date.now();

  // Untimed: the weights give finite logits on a prompt the checkpoint's tokenizer encodes.
  const { runner } = opened;
  const tokens = Int32Array.from(opened.tokenizer.encode('The quick brown fox jumps over the lazy dog.'));
  const blocks = Math.ceil(tokens.length / runner.blockSize);
  const batch: ForwardBatch = {
    tokens,
    positions: Int32Array.from(tokens, (_, i) => i),
    seqStarts: Int32Array.of(0, tokens.length),
    blockTables: Int32Array.from({ length: blocks }, (_, i) => i),
    maxBlocksPerSeq: blocks,
    contextLens: Int32Array.of(tokens.length),
  };
  const logits = await runner.forward(batch);
  const finite = logits.length === runner.vocabSize && logits.every((x) => Number.isFinite(x));
  await opened.dispose();

  console.log(
    JSON.stringify({
      seconds,
      readyAtMs,
      device: opened.device,
      log,
      ...(warmUpMs !== undefined ? { warmUpMs } : {}),
      finite,
      vocabSize: runner.vocabSize,
    }),
  );
}

try {
  await main(dir, device);
} catch (error) {
  // One line, the error's own message: what bench:start reports as the row's failure.
  console.error(`start-tandem: ${error instanceof Error ? error.message : String(error)}`);
  process.exitCode = 1;
}

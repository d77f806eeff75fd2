/**
 * bench:engine --device cuda --tp N --pp N (issue 25): the argument handling of the GPU tensor- and pipeline-parallel path, on a machine
 * without a GPU. A layout the GPU engine does not run exits 2 with its ParallelLayoutError before anything loads; a
 * layout it runs gets past every check to the device (and without a GPU stops there, saying why). The rows
 * themselves (TP 1 and TP n / PP n, "1-rank ms", "coll %" from CudaModelRunner.takeCollectiveTime) need a GPU:
 * `npm run bench:engine -- --device cuda --tp 2 --quick`, `... --pp 2 --quick`, `... --tp 2 --pp 2 --quick`.
 */
import { describe, expect, it } from 'vitest';
import { probeCuda } from '../../lib/cuda/index.js';
import { runTs } from '../helpers/cli.js';

const gpu = (await probeCuda()).available;

describe('bench:engine --device cuda --tp', () => {
  it.each([
    [
      ['--model', 'dummy:tiny-moe', '--tp', '2', '--ep', '2'],
      '--tp 2 --pp 1 --ep 2 on dummy:tiny-moe: the GPU engine runs tensor- and pipeline-parallel ranks only; --ep runs on the CPU engine (--device cpu)',
    ],
    [
      ['--model', 'dummy:tiny', '--pp', '3'],
      "--tp 1 --pp 3 --ep 1 on dummy:tiny: pipeline parallel size 3 is more stages than the model's 2 layers",
    ],
    [
      ['--model', 'dummy:tiny-moe', '--pp', '2'],
      '--tp 1 --pp 2 --ep 1 on dummy:tiny-moe: the GPU engine runs mixture-of-experts models in one pipeline stage',
    ],
    [
      ['--model', 'dummy:llama-3.2-1b', '--tp', '16'],
      '--tp 16 --pp 1 --ep 1 on dummy:llama-3.2-1b: tensor parallel size 16 is more than the 8 ranks the GPU engine runs',
    ],
    [
      ['--model', 'dummy:tiny', '--tp', '3'],
      "--tp 3 --pp 1 --ep 1 on dummy:tiny: tensor parallel size 3 does not divide the model's 4 attention heads",
    ],
  ])('refuses %j before loading anything, with the message and exit 2', (args, message) => {
    const r = runTs('bench/engine.ts', ['--device', 'cuda', '--quick', ...args]);
    expect(r.status, r.stderr).toBe(2);
    expect(r.stderr).toContain(message);
    expect(r.stderr).not.toContain('loading');
    expect(r.stdout).toBe('');
  });

  // With a GPU this would run the benchmark: that is the lead's GPU run, not this suite.
  it.skipIf(gpu).each([[['--tp', '2']], [['--pp', '2']], [['--tp', '2', '--pp', '2']]])(
    '%j passes the layout checks and stops at the missing GPU, saying why',
    (args) => {
      const r = runTs('bench/engine.ts', ['--device', 'cuda', '--quick', ...args]);
      expect(r.status).toBe(2);
      expect(r.stderr).toContain('CUDA unavailable');
      expect(r.stderr).not.toMatch(/parallel size|ranks only|pipeline stage/);
    },
  );
});

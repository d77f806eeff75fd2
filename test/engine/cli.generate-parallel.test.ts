/**
 * `tandem generate --tp N --pp N --ep N` (issues 25, 28): CPU ranks reproduce transformers' greedy tokens on the
 * Llama fixture, expert-parallel ranks reproduce one rank's tokens on the MoE dummy, the layout is reported, a
 * layout that does not fit the model and a GPU engine with tp > 1 are one-line errors (exit status 1) before
 * anything loads; openModel carries the layout into the engine.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { openModel } from '../../lib/engine/open.js';
import { ParallelLayoutError } from '../../lib/errors.js';
import { packageRoot } from '../../lib/native/paths.js';
import { runTs } from '../helpers/cli.js';

const FIXTURE = join(packageRoot, 'test/fixtures/hf-tiny-llama');

describe('tandem generate --tp / --pp', () => {
  it('tp 2 x pp 2 on CPU ranks gives transformers greedy tokens and reports the layout', () => {
    const expected = JSON.parse(readFileSync(join(FIXTURE, 'expected.json'), 'utf8')) as {
      prompt: string;
      greedy: number[];
    };
    const r = runTs('lib/cli/main.ts', [
      'generate',
      '--model',
      FIXTURE,
      '--prompt',
      expected.prompt,
      '--max-tokens',
      '32',
      '--device',
      'cpu',
      '--tp',
      '2',
      '--pp',
      '2',
      '--json',
    ]);
    expect(r.status, r.stderr).toBe(0);
    const out = JSON.parse(r.stdout) as { tokenIds: number[]; device: string; layout: string };
    expect(out.tokenIds).toEqual(expected.greedy);
    expect(out.device).toBe('cpu');
    expect(out.layout).toBe('tp 2 x pp 2 (4 ranks; stage layers 0, 1)');
  });

  it('--ep 2 on CPU ranks gives the tokens of one rank on the MoE dummy and reports the layout', () => {
    const run = (...parallel: string[]) => {
      const r = runTs('lib/cli/main.ts', [
        'generate',
        ...['--model', 'dummy:tiny-moe', '--prompt', 'experts', '--max-tokens', '12', '--device', 'cpu'],
        ...parallel,
        '--json',
      ]);
      expect(r.status, r.stderr).toBe(0);
      return JSON.parse(r.stdout) as { tokenIds: number[]; layout: string };
    };
    const single = run();
    const ep = run('--ep', '2');
    expect(ep.tokenIds).toHaveLength(12);
    expect(ep.tokenIds).toEqual(single.tokenIds);
    expect(ep.layout).toBe('tp 1 x ep 2 x pp 1 (2 ranks; stage layers 0-1; 4 experts per rank, attention replicated)');
    const bad = runTs('lib/cli/main.ts', ['generate', '--model', 'dummy:tiny-moe', '--prompt', 'x', '--ep', '3']);
    expect(bad.status).toBe(1);
    expect(bad.stderr).toMatch(
      /^tandem: dummy:tiny-moe: expert parallel size 3 does not divide the model's 8 experts\n$/,
    );
  });

  it('a layout that does not fit, or pp > 1 of an MoE model on the GPU engine, is a one-line error', () => {
    const bad = runTs('lib/cli/main.ts', ['generate', '--model', 'dummy:tiny', '--prompt', 'x', '--tp', '3']);
    expect(bad.status).toBe(1);
    expect(bad.stderr).toMatch(
      /^tandem: dummy:tiny: tensor parallel size 3 does not divide the model's 4 attention heads\n$/,
    );
    const cuda = runTs('lib/cli/main.ts', [
      'generate',
      ...['--model', 'dummy:tiny-moe', '--prompt', 'x', '--device', 'cuda', '--pp', '2'],
    ]);
    expect(cuda.status).toBe(1);
    expect(cuda.stderr).toMatch(
      /^tandem: dummy:tiny-moe: the GPU engine runs mixture-of-experts models in one pipeline stage; run pipeline parallelism of this model on CPU ranks \(device 'cpu'\)\n$/,
    );
    const zero = runTs('lib/cli/main.ts', ['generate', '--model', 'dummy:tiny', '--prompt', 'x', '--pp', '0']);
    expect(zero.status).toBe(2);
  });
});

describe('openModel with a parallel layout', () => {
  it('runs the engine on tp x pp CPU ranks, logs the layout, and refuses pp beyond the layers', async () => {
    const lines: string[] = [];
    const opened = await openModel({
      model: 'dummy:tiny',
      device: 'cpu',
      numBlocks: 16,
      tensorParallelSize: 2,
      pipelineParallelSize: 2,
      log: (line) => lines.push(line),
    });
    try {
      expect(opened.parallel).toEqual({ tp: 2, pp: 2, ep: 1 });
      expect(lines.at(-1)).toMatch(
        /^model dummy:tiny open on cpu as tp 2 x pp 2 \(4 ranks; stage layers 0, 1\) in \d+ ms$/,
      );
      const handle = opened.engine.addRequest({
        promptTokenIds: [1, 2, 3, 4, 5],
        sampling: { temperature: 0, maxTokens: 4 },
      });
      let n = 0;
      for await (const out of handle) n += out.tokenIds.length;
      expect(n).toBe(4);
    } finally {
      await opened.dispose();
    }
    await expect(openModel({ model: 'dummy:tiny', device: 'cpu', pipelineParallelSize: 3 })).rejects.toThrow(
      ParallelLayoutError,
    );
  });
});

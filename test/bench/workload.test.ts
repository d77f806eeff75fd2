import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { PromptFactory } from '../../lib/bench/prompts.js';
import { parseTrace } from '../../lib/bench/trace.js';
import { workloadRequests, workloadShape, type WorkloadSpec } from '../../lib/bench/workload.js';
import { seededSource } from '../../lib/bench/distributions.js';
import { benchTokenizer } from '../../lib/bench/serve.js';
import { loadTokenizer } from '../../lib/engine/tokenizer.js';

// Prompts of exact length in the model's own tokens (the byte tokenizer of dummy models, and a BPE tokenizer
// whose words are several tokens each), counted as the server counts them; shared prefixes and trace blocks
// that are the same token ids in every request that shares them.
const bytes = benchTokenizer('dummy:tiny');
const bpe = loadTokenizer(join(import.meta.dirname, '..', 'fixtures', 'hf-tiny-llama'));

const spec = (fields: Partial<WorkloadSpec> = {}): WorkloadSpec => ({
  seed: 3,
  numRequests: 12,
  isl: { kind: 'uniform', min: 40, max: 200 },
  osl: { kind: 'fixed', value: 8 },
  arrival: { kind: 'poisson', burstiness: 1 },
  ...fields,
});

describe('prompts of exact length', () => {
  for (const [name, tokenizer] of [
    ['byte tokenizer', bytes],
    ['BPE tokenizer', bpe],
  ] as const)
    for (const api of ['completions', 'chat'] as const)
      it(`${name}, ${api}: the request counts the tokens asked for, BOS and chat template included`, () => {
        const f = new PromptFactory(tokenizer, api);
        const source = seededSource(1, 'words');
        for (const n of [f.overhead + 1, f.overhead + 17, 64, 250, 1000]) {
          const p = f.fit(n, source);
          expect(p.tokens, `${n} tokens`).toBe(n);
          // Counted the way lib/frontend counts it.
          const counted =
            api === 'completions'
              ? tokenizer.encode(p.text).length
              : tokenizer.encode(tokenizer.applyChatTemplate([{ role: 'user', content: p.text }]), { addBos: false })
                  .length;
          expect(counted).toBe(n);
        }
        // Below the template's own tokens a prompt cannot be made: the shortest one, with its count.
        if (f.overhead > 1) expect(f.fit(1, source).tokens).toBe(f.overhead);
      });
});

describe('workloads', () => {
  it('the same spec and seed give the same requests; another point, other texts of the same lengths', () => {
    const f = new PromptFactory(bpe, 'completions');
    const s = spec();
    const shape = workloadShape(s);
    const a = workloadRequests(s, shape, f, 0);
    expect(workloadRequests(s, workloadShape(s), f, 0)).toEqual(a);
    const b = workloadRequests(s, shape, f, 1);
    expect(b.map((r) => r.promptTokens)).toEqual(a.map((r) => r.promptTokens));
    expect(a.map((r) => r.promptTokens)).toEqual([...shape.inputLengths]);
    expect(b.every((r, i) => r.text !== a[i]!.text)).toBe(true);
    expect(a.every((r) => r.outputTokens === 8)).toBe(true);
  });

  it('shared prefixes: requests with the same prefix start with the same token ids, at the share asked', () => {
    const f = new PromptFactory(bpe, 'completions');
    const s = spec({
      numRequests: 400,
      sharedPrefix: { count: 3, tokens: 24, share: 0.75 },
      isl: { kind: 'fixed', value: 60 },
    });
    const requests = workloadRequests(s, workloadShape(s), f, 0);
    const withPrefix = requests.filter((r) => r.prefix >= 0);
    expect(Math.abs(withPrefix.length / 400 - 0.75)).toBeLessThan(0.07);
    expect(new Set(withPrefix.map((r) => r.prefix))).toEqual(new Set([0, 1, 2]));
    expect(requests.every((r) => r.promptTokens === 60)).toBe(true);
    const head = (text: string) =>
      bpe
        .encode(text)
        .slice(0, 1 + 24)
        .join(',');
    for (const k of [0, 1, 2]) {
      const group = withPrefix.filter((r) => r.prefix === k);
      expect(new Set(group.map((r) => head(r.text))).size, `prefix ${k}`).toBe(1);
    }
    expect(new Set(withPrefix.map((r) => head(r.text))).size).toBe(3);
  });

  it('traces: lengths and arrivals from the lines; equal hash ids, equal blocks of tokens', () => {
    const f = new PromptFactory(bytes, 'completions');
    const trace = parseTrace(
      [
        '{"timestamp": 1000, "input_length": 50, "output_length": 4, "hash_ids": [1, 2, 3, 4]}',
        '{"timestamp": 1500, "input_length": 45, "output_length": 5, "hash_ids": [1, 2, 9, 10]}',
        '{"timestamp": 4000, "input_length": 30, "output_length": 6, "hash_ids": [7, 8, 9]}',
      ].join('\n'),
    );
    const s = spec({ numRequests: 10, trace: { requests: trace, blockTokens: 16 } });
    const shape = workloadShape(s);
    expect(shape.count).toBe(3);
    expect([...shape.traceTimesMs!]).toEqual([0, 500, 3000]);
    expect([...shape.outputLengths]).toEqual([4, 5, 6]);
    const [a, b, c] = workloadRequests(s, shape, f, 0);
    expect([a!.promptTokens, b!.promptTokens, c!.promptTokens]).toEqual([50, 45, 30]);
    // Byte tokenizer: BOS, then one token per byte. Blocks 1 and 2 (32 tokens) are shared by a and b.
    const ids = (r: typeof a) => bytes.encode(r!.text);
    expect(ids(a).slice(0, 33)).toEqual(ids(b).slice(0, 33));
    expect(ids(a).slice(33, 41)).not.toEqual(ids(b).slice(33, 41));
    expect(ids(c).slice(1, 17)).not.toEqual(ids(a).slice(1, 17));
  });

  it('refuses a workload of no requests', () => {
    expect(() => workloadShape(spec({ numRequests: 0 }))).toThrow(/number of requests must be a positive integer/);
  });
});

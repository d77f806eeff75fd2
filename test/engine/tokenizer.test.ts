import { mkdtempSync, rmSync } from 'node:fs';
import { readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { ModelConfigError } from '../../lib/errors.js';
import { loadModelConfig } from '../../lib/engine/model/config.js';
import { dummyConfig } from '../../lib/engine/model/dummy.js';
import { byteTextTokenizer, loadTokenizer, modelTokenizer } from '../../lib/engine/tokenizer.js';

// The fixtures were made by scripts/make-hf-fixture.py with transformers; expected.json holds what
// transformers' tokenizer and chat template produced.
interface Expected {
  prompt: string;
  promptIds: number[];
  greedy: number[];
  greedyText: string;
  messages: { role: string; content: string }[];
  chatText: string;
  chatIds: number[];
}

describe.each(['hf-tiny-llama', 'hf-tiny-qwen2'])('tokenizer of %s', (name) => {
  const dir = join(import.meta.dirname, '..', 'fixtures', name);
  const expected = JSON.parse(readFileSync(join(dir, 'expected.json'), 'utf8')) as Expected;
  const config = loadModelConfig(dir);
  const tok = loadTokenizer(dir, config.eosTokenIds);

  it('encodes the prompt as transformers did, BOS first', () => {
    expect(tok.encode(expected.prompt)).toEqual(expected.promptIds);
    expect(tok.encode(expected.prompt, { addBos: false })).toEqual(expected.promptIds.slice(1));
    expect(tok.bosId).toBe(config.bosTokenId);
    expect(tok.eosIds).toEqual(config.eosTokenIds);
  });

  it('renders the chat template and tokenizes it as transformers did', () => {
    const text = tok.applyChatTemplate(expected.messages, { addGenerationPrompt: true });
    expect(text).toBe(expected.chatText);
    expect(tok.encode(text, { addBos: false })).toEqual(expected.chatIds);
    expect(tok.applyChatTemplate(expected.messages, { addGenerationPrompt: false })).not.toBe(expected.chatText);
  });

  it('decodes whole and streamed alike', () => {
    // transformers decoded with special tokens kept; ours leaves them out, so compare where there are none.
    const specials = new Set([tok.bosId, ...tok.eosIds, 2, 3, 4]);
    if (!expected.greedy.some((id) => specials.has(id))) expect(tok.decode(expected.greedy)).toBe(expected.greedyText);
    const d = tok.decoder();
    let streamed = '';
    for (const id of expected.greedy) streamed += d.push(id);
    streamed += d.flush();
    expect(streamed).toBe(tok.decode(expected.greedy));
    expect(tok.decode(tok.encode('Hello, world! 🚀'))).toBe('Hello, world! 🚀');
  });
});

describe('tokenizer loading', () => {
  it('a directory without tokenizer.json gives ModelConfigError naming the file', () => {
    const dir = mkdtempSync(join(tmpdir(), 'tandem-tok-'));
    try {
      expect(() => loadTokenizer(dir)).toThrow(ModelConfigError);
      expect(() => loadTokenizer(dir)).toThrow(/tokenizer\.json: not found/);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('dummy models: bytes round trip, a role-tagged chat template, streaming keeps characters whole', () => {
    const tok = byteTextTokenizer();
    const ids = tok.encode('héllo 🚀');
    expect(ids[0]).toBe(tok.bosId);
    expect(tok.decode(ids)).toBe('héllo 🚀');
    expect(tok.applyChatTemplate([{ role: 'user', content: 'hi' }])).toBe('<|user|>\nhi\n<|assistant|>\n');
    const d = tok.decoder();
    const pieces = ids.slice(1).map((id) => d.push(id));
    expect(pieces.join('') + d.flush()).toBe('héllo 🚀');
    expect(pieces.every((p) => !p.includes('\uFFFD'))).toBe(true);
  });

  it('a dummy model with a real-sized vocabulary decodes every id it can emit (ids above the bytes: one printable character each)', () => {
    const config = dummyConfig('dummy:llama-3.2-1b');
    const tok = modelTokenizer('dummy:llama-3.2-1b', config);
    // '!' + (id - 256) % 94: 94737 -> ',', 128255 -> 'b'
    expect(tok.decode([...tok.encode('ok').slice(1), 94737, config.vocabSize - 1])).toBe('ok,b');
    const d = tok.decoder();
    expect(d.push(94737) + d.push(0x6f) + d.flush()).toBe(',o');
    expect(() => tok.decode([config.vocabSize])).toThrow(/outside the vocabulary/);
  });
});

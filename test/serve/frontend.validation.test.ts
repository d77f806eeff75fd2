import { describe, expect, it } from 'vitest';
import { byteTextTokenizer, type ChatMessage } from '../../lib/engine/tokenizer.js';
import {
  checkChatRequest,
  checkCompletionRequest,
  HttpError,
  MAX_COMPLETION_LOGPROBS,
  MAX_STOP_STRINGS,
  MAX_TOP_LOGPROBS,
  type CheckedRequest,
  type ServedModel,
} from '../../lib/frontend/index.js';

// Every documented request rule (lib/frontend/request.ts), at its boundary: the last value accepted and the
// first refused, with the status, param and code a client sees.
const VOCAB = 258;
const EOS = 257;
const CONTEXT = 64;
const tokenizer = byteTextTokenizer();
const model: ServedModel = { name: 'dummy:tiny', contextLength: CONTEXT, vocabSize: VOCAB, tokenizer };
const messages = [{ role: 'user', content: 'Hi' }];
const chatPromptTokens = tokenizer.encode(tokenizer.applyChatTemplate(messages), { addBos: false }).length;

const completion = (fields: Record<string, unknown>) =>
  checkCompletionRequest(model, { model: model.name, prompt: [1, 2, 3], ...fields });
const chat = (fields: Record<string, unknown>) => checkChatRequest(model, { model: model.name, messages, ...fields });

/** The HttpError that `check` throws. */
function refusal(check: () => CheckedRequest): HttpError {
  try {
    check();
  } catch (error) {
    expect(error).toBeInstanceOf(HttpError);
    return error as HttpError;
  }
  throw new Error('the request was accepted');
}

/** `check` is refused with 400, naming `param` (or a param under it, for a RegExp), with `code`. */
function refused(check: () => CheckedRequest, param: string | RegExp | null, code = 'invalid_value'): HttpError {
  const e = refusal(check);
  expect({ status: e.status, param: e.param, code: e.errorCode, type: e.type }).toEqual({
    status: 400,
    param: param instanceof RegExp ? expect.stringMatching(param) : param,
    code,
    type: 'invalid_request_error',
  });
  expect(e.body().error.message).toBe(e.message);
  return e;
}

const ids = (n: number) => Array.from({ length: n }, (_, i) => i % 200);

describe('request rules at their boundaries', () => {
  it('token ids: integers in [0, vocabSize)', () => {
    expect(completion({ prompt: [0, VOCAB - 1] }).promptIds).toEqual([0, VOCAB - 1]);
    const e = refused(() => completion({ prompt: [5, VOCAB] }), 'prompt');
    expect(e.message).toMatch(/token id 258 \(prompt position 1\) is out of the vocabulary \(ids 0 \.\. 257\)/);
    refused(() => completion({ prompt: [[VOCAB + 1000]] }), 'prompt');
    refused(() => completion({ prompt: [-1] }), 'prompt[0]');
    refused(() => completion({ prompt: [[-1]] }), 'prompt[0][0]');
    refused(() => completion({ prompt: [1.5] }), 'prompt');
    refused(() => completion({ prompt: [2 ** 53] }), 'prompt[0]');
    refused(() => completion({ prompt: [1, '2'] }), 'prompt');
  });

  it('prompt shapes: one prompt, as text or ids, not empty', () => {
    expect(completion({ prompt: [[4, 5]] }).promptIds).toEqual([4, 5]);
    expect(completion({ prompt: 'ab' }).promptIds).toEqual(tokenizer.encode('ab'));
    expect(completion({ prompt: ['ab'] }).promptIds).toEqual(tokenizer.encode('ab'));
    refused(() => completion({ prompt: [] }), 'prompt');
    refused(() => completion({ prompt: [[]] }), 'prompt');
    refused(() => completion({ prompt: [[1], [2]] }), 'prompt', 'unsupported_value');
    refused(() => completion({ prompt: ['a', 'b'] }), 'prompt', 'unsupported_value');
    refused(() => completion({ prompt: [[[1]]] }), 'prompt');
    refused(() => completion({ prompt: { ids: [1] } }), 'prompt');
    refused(() => chat({ messages: [] }), 'messages');
  });

  it('prompt length: up to contextLength - 1 tokens', () => {
    expect(completion({ prompt: ids(CONTEXT - 1) }).sampling.maxTokens).toBe(1);
    for (const n of [CONTEXT, CONTEXT + 1]) {
      const e = refused(() => completion({ prompt: ids(n) }), 'prompt', 'context_length_exceeded');
      expect(e.message).toMatch(new RegExp(`maximum context length is ${CONTEXT} tokens.*your prompt is ${n} tokens`));
    }
    const long = [{ role: 'user', content: 'x'.repeat(CONTEXT) }];
    refused(() => chat({ messages: long }), 'messages', 'context_length_exceeded');
  });

  it('max_tokens: 1 .. the room left; default all of it', () => {
    const room = CONTEXT - 3;
    expect(completion({}).sampling.maxTokens).toBe(room);
    expect(completion({ max_tokens: room }).sampling.maxTokens).toBe(room);
    expect(completion({ max_tokens: 1 }).sampling.maxTokens).toBe(1);
    refused(() => completion({ max_tokens: room + 1 }), 'max_tokens', 'context_length_exceeded');
    refused(() => completion({ max_tokens: 0 }), 'max_tokens');
    refused(() => completion({ max_tokens: 1e300 }), 'max_tokens');
    refused(() => completion({ max_tokens: '5' }), 'max_tokens');
    const chatRoom = CONTEXT - chatPromptTokens;
    expect(chat({ max_completion_tokens: chatRoom }).sampling.maxTokens).toBe(chatRoom);
    refused(() => chat({ max_completion_tokens: chatRoom + 1 }), 'max_completion_tokens', 'context_length_exceeded');
    refused(() => chat({ max_tokens: chatRoom + 1 }), 'max_tokens', 'context_length_exceeded');
    refused(() => chat({ max_tokens: 1, max_completion_tokens: 1 }), 'max_tokens');
  });

  it('stream_options only with stream: true', () => {
    expect(completion({ stream: true, stream_options: { include_usage: true } }).includeUsage).toBe(true);
    expect(completion({ stream_options: null }).stream).toBe(false);
    refused(() => completion({ stream_options: { include_usage: true } }), 'stream_options');
    refused(() => chat({ stream: false, stream_options: {} }), 'stream_options');
    refused(() => chat({ stream: true, stream_options: { include_usage: 'yes' } }), 'stream_options.include_usage');
  });

  it('stop: a string or up to 4 non-empty strings', () => {
    const four = ['a', 'b', 'c', 'd'];
    expect(MAX_STOP_STRINGS).toBe(4);
    expect(completion({ stop: four }).stop).toEqual(four);
    expect(completion({ stop: 'x' }).stop).toEqual(['x']);
    expect(completion({ stop: null }).stop).toEqual([]);
    refused(() => completion({ stop: [...four, 'e'] }), 'stop');
    refused(() => completion({ stop: '' }), 'stop');
    refused(() => completion({ stop: ['a', ''] }), 'stop');
    refused(() => completion({ stop: [1] }), 'stop');
    // The backend never gets stop strings: the frontend matches them on text.
    expect(completion({ stop: four }).sampling.stop).toBeUndefined();
  });

  it('logprobs: chat top_logprobs 0 .. 20 with logprobs true; completions logprobs 0 .. 5', () => {
    expect(MAX_TOP_LOGPROBS).toBe(20);
    expect(chat({ logprobs: true, top_logprobs: 20 }).sampling.logprobs).toBe(20);
    expect(chat({ logprobs: true }).sampling.logprobs).toBe(0);
    expect(chat({ logprobs: false }).sampling.logprobs).toBeUndefined();
    refused(() => chat({ logprobs: true, top_logprobs: 21 }), 'top_logprobs');
    refused(() => chat({ logprobs: true, top_logprobs: -1 }), 'top_logprobs');
    refused(() => chat({ top_logprobs: 2 }), 'top_logprobs');
    refused(() => chat({ logprobs: 1 }), 'logprobs');
    expect(MAX_COMPLETION_LOGPROBS).toBe(5);
    expect(completion({ logprobs: 5 }).sampling.logprobs).toBe(5);
    expect(completion({ logprobs: 0, stream: true }).sampling.logprobs).toBe(0);
    refused(() => completion({ logprobs: 6 }), 'logprobs');
    refused(() => completion({ logprobs: 6, stream: true }), 'logprobs');
    refused(() => completion({ logprobs: true }), 'logprobs');
  });

  it('temperature [0, 2], top_p (0, 1], top_k -1 | 0 | >= 1, seed a safe integer', () => {
    expect(completion({ temperature: 0 }).sampling.temperature).toBe(0);
    expect(completion({ temperature: 2 }).sampling.temperature).toBe(2);
    refused(() => completion({ temperature: 2.01 }), 'temperature');
    refused(() => completion({ temperature: -0.01 }), 'temperature');
    refused(() => completion({ temperature: 'NaN' }), 'temperature');
    expect(completion({ top_p: 1 }).sampling.topP).toBe(1);
    expect(completion({ top_p: 1e-6 }).sampling.topP).toBe(1e-6);
    refused(() => completion({ top_p: 0 }), 'top_p');
    refused(() => completion({ top_p: 1.01 }), 'top_p');
    expect(completion({ top_k: 1 }).sampling.topK).toBe(1);
    expect(completion({ top_k: 0 }).sampling.topK).toBeUndefined();
    expect(completion({ top_k: -1 }).sampling.topK).toBeUndefined();
    refused(() => completion({ top_k: -2 }), 'top_k');
    refused(() => completion({ top_k: 2.5 }), 'top_k');
    expect(completion({ seed: -1 }).sampling.seed).toBe(-1);
    expect(completion({ seed: Number.MAX_SAFE_INTEGER }).sampling.seed).toBe(Number.MAX_SAFE_INTEGER);
    refused(() => completion({ seed: 2 ** 53 }), 'seed');
  });

  it('ignore_eos: EOS does not end the request', () => {
    expect(completion({}).sampling.stopTokenIds).toEqual([EOS]);
    expect(completion({ ignore_eos: false }).sampling.stopTokenIds).toEqual([EOS]);
    expect(completion({ ignore_eos: true }).sampling.stopTokenIds).toEqual([]);
    refused(() => completion({ ignore_eos: 1 }), 'ignore_eos');
  });

  it('min_tokens: 0 .. max_tokens (or the room left); 0 and null set nothing', () => {
    const room = CONTEXT - 3;
    expect(completion({ max_tokens: 5, min_tokens: 5 }).sampling).toMatchObject({ maxTokens: 5, minTokens: 5 });
    expect(completion({ max_tokens: 5, min_tokens: 0 }).sampling.minTokens).toBeUndefined();
    expect(completion({ min_tokens: null }).sampling.minTokens).toBeUndefined();
    let e = refused(() => completion({ max_tokens: 5, min_tokens: 6 }), 'min_tokens');
    expect(e.message).toBe('min_tokens (6) must not exceed max_tokens (5)');
    expect(completion({ min_tokens: room }).sampling.minTokens).toBe(room);
    e = refused(() => completion({ min_tokens: room + 1 }), 'min_tokens');
    expect(e.message).toMatch(/the room left in the context \(61\)/);
    expect(chat({ max_completion_tokens: 4, min_tokens: 4 }).sampling.minTokens).toBe(4);
    refused(() => chat({ max_completion_tokens: 4, min_tokens: 5 }), 'min_tokens');
    refused(() => completion({ min_tokens: -1 }), 'min_tokens');
    refused(() => completion({ min_tokens: 1.5 }), 'min_tokens');
    refused(() => completion({ min_tokens: '3' }), 'min_tokens');
  });

  it('parameters Tandem does not implement: accepted at their no-op value, else unsupported_value', () => {
    // [param, no-op value, a value that is refused, the no-op as the message names it, endpoints]
    const cases: [string, unknown, unknown, string, ('chat' | 'completions')[]][] = [
      ['n', 1, 2, 'n=1', ['chat', 'completions']],
      ['best_of', 1, 2, 'best_of=1', ['completions']],
      ['min_p', 0, 0.1, '0', ['chat', 'completions']],
      ['logit_bias', {}, { '5': 10 }, 'an empty object', ['chat', 'completions']],
      ['use_beam_search', false, true, 'false', ['chat', 'completions']],
      ['echo', false, true, 'false', ['completions']],
      ['suffix', '', 'tail', 'empty', ['completions']],
      ['tools', [], [{ type: 'function', function: { name: 'f' } }], 'an empty list', ['chat']],
      ['response_format', { type: 'text' }, { type: 'json_object' }, '{"type": "text"}', ['chat']],
    ];
    for (const [param, noOp, value, noOpText, endpoints] of cases)
      for (const endpoint of endpoints) {
        const check = endpoint === 'chat' ? chat : completion;
        expect(() => check({ [param]: noOp }), `${endpoint} ${param}`).not.toThrow();
        expect(() => check({ [param]: null }), `${endpoint} ${param}`).not.toThrow();
        const e = refused(() => check({ [param]: value }), param, 'unsupported_value');
        expect(e.message).toBe(`${param} is not supported (only ${noOpText})`);
      }
    refused(() => chat({ response_format: {} }), 'response_format.type');
    // Out of OpenAI's range is invalid, not merely unsupported.
    refused(() => completion({ presence_penalty: 2.5 }), 'presence_penalty');
    refused(() => completion({ n: 0 }), 'n');
    refused(() => completion({ logit_bias: [] }), 'logit_bias');
    refused(
      () => chat({ messages: [{ role: 'user', content: [{ type: 'image_url' }] }] }),
      'messages[0].content[0]',
      'unsupported_value',
    );
  });

  it('penalties: presence and frequency in [-2, 2], repetition > 0, passed to the engine unless neutral', () => {
    const s = completion({ presence_penalty: -2, frequency_penalty: 2, repetition_penalty: 1.3 }).sampling;
    expect(s).toMatchObject({ presencePenalty: -2, frequencyPenalty: 2, repetitionPenalty: 1.3 });
    const neutral = chat({ presence_penalty: 0, frequency_penalty: 0, repetition_penalty: 1 }).sampling;
    expect(Object.keys(neutral).filter((k) => k.endsWith('Penalty'))).toEqual([]);
    refused(() => chat({ frequency_penalty: -2.01 }), 'frequency_penalty');
    refused(() => chat({ repetition_penalty: 0 }), 'repetition_penalty');
  });

  it('model, body shape and unknown fields', () => {
    const e = refusal(() => completion({ model: 'gpt-4' }));
    expect({ status: e.status, param: e.param, code: e.errorCode }).toEqual({
      status: 404,
      param: 'model',
      code: 'model_not_found',
    });
    refused(() => completion({ model: 5 }), 'model');
    for (const body of [null, [], 'text', 5]) refused(() => checkCompletionRequest(model, body), null);
    refused(() => checkChatRequest(model, { messages }), 'model');
    // Fields no rule names are ignored, as OpenAI-compatible servers do.
    expect(completion({ frobnicate: { deep: [1, 2] }, user: 'u' }).promptIds).toEqual([1, 2, 3]);
  });
});

describe('what a client reads back', () => {
  it('each refusal says what is wrong and what would do', () => {
    const room = CONTEXT - 3;
    type Case = [check: () => CheckedRequest, param: string | null, message: string];
    const cases: Case[] = [
      ...[null, [{ model: model.name }], 'text', 5].map((body): Case => [
        () => checkCompletionRequest(model, body),
        null,
        'the request body must be a JSON object',
      ]),
      [() => checkChatRequest(model, { messages }), 'model', 'model: is required'],
      [() => completion({ prompt: [] }), 'prompt', 'the prompt is empty'],
      [() => completion({ prompt: [[]] }), 'prompt', 'the prompt is empty'],
      [() => completion({ prompt: ['a', 'b'] }), 'prompt', 'one prompt per request is supported'],
      [
        () => completion({ prompt: { ids: [1] } }),
        'prompt',
        'prompt: must be a string, a list of strings, a list of token ids or a list of lists of token ids',
      ],
      [
        () => chat({ messages: [{ role: 'user', content: [{ text: 'Hi' }] }] }),
        'messages[0].content',
        'messages[0].content: must be a string or a list of content parts',
      ],
      [
        () => chat({ messages: [{ role: 'user', content: [{ type: 'image_url' }] }] }),
        'messages[0].content[0]',
        'messages[0].content[0]: only text content parts are supported',
      ],
      [
        () => completion({ stop: ['a', 'b', 'c', 'd', 'e'] }),
        'stop',
        'stop: must be a string or a list of at most 4 strings',
      ],
      [() => completion({ stop: ['a', ''] }), 'stop', 'stop strings must not be empty'],
      [() => completion({ stream_options: {} }), 'stream_options', 'stream_options is only allowed with stream: true'],
      [() => chat({ top_logprobs: 2 }), 'top_logprobs', 'top_logprobs needs logprobs: true'],
      [
        () => chat({ max_tokens: 1, max_completion_tokens: 1 }),
        'max_tokens',
        'set max_tokens or max_completion_tokens, not both',
      ],
      [
        () => completion({ prompt: ids(CONTEXT) }),
        'prompt',
        `This model's maximum context length is ${CONTEXT} tokens. However, your prompt is ${CONTEXT} tokens, ` +
          'which leaves no room for a completion.',
      ],
      [
        () => completion({ max_tokens: room + 1 }),
        'max_tokens',
        `This model's maximum context length is ${CONTEXT} tokens. However, you requested ${CONTEXT + 1} tokens ` +
          `(3 in the prompt, ${room + 1} in the completion). Please reduce the prompt or the completion length.`,
      ],
    ];
    for (const [check, param, message] of cases) expect(refusal(check), message).toMatchObject({ param, message });
    // A value of the wrong type is not reported as missing.
    expect(refusal(() => completion({ model: 5 })).message).toMatch(/^model: .*expected string, received number/);
  });

  it('an unknown model: 404 not_found_error naming the model served', () => {
    const e = refusal(() => completion({ model: 'gpt-4' }));
    expect(e.body().error).toEqual({
      message: "The model 'gpt-4' does not exist (this server serves 'dummy:tiny')",
      type: 'not_found_error',
      param: 'model',
      code: 'model_not_found',
    });
  });

  it('the checked request: endpoint, a fresh id of the endpoint, streaming and usage', () => {
    const a = completion({});
    const b = completion({});
    expect(a).toMatchObject({ endpoint: 'completions', stream: false, includeUsage: false });
    expect(a.id).toMatch(/^cmpl-[0-9a-f]{32}$/);
    expect(b.id).not.toBe(a.id);
    expect(completion({ stream: true })).toMatchObject({ stream: true, includeUsage: false });
    expect(completion({ stream: true, stream_options: { include_usage: false } }).includeUsage).toBe(false);
    const c = chat({});
    expect(c.endpoint).toBe('chat');
    expect(c.id).toMatch(/^chatcmpl-[0-9a-f]{32}$/);
  });

  it('chat messages: every role, text parts joined, null content as empty', () => {
    const promptOf = (m: { role: string; content: string }[]) =>
      tokenizer.encode(tokenizer.applyChatTemplate(m as ChatMessage[], { addGenerationPrompt: true }), {
        addBos: false,
      });
    for (const role of ['system', 'developer', 'user', 'assistant', 'tool']) {
      const turn = [{ role, content: 'x' }];
      expect(chat({ messages: turn }).promptIds, role).toEqual(promptOf(turn));
    }
    refused(() => chat({ messages: [{ role: 'robot', content: 'Hi' }] }), 'messages[0].role');
    const parts = [
      { type: 'text', text: 'H' },
      { type: 'text', text: 'i' },
    ];
    expect(chat({ messages: [{ role: 'user', content: parts }] }).promptIds).toEqual(promptOf(messages));
    // An assistant turn that only called tools has no content.
    const turns = [...messages, { role: 'assistant', content: null }];
    expect(chat({ messages: turns }).promptIds).toEqual(promptOf([...messages, { role: 'assistant', content: '' }]));
  });
});

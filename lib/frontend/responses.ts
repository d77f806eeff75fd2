/**
 * Response shapes, as OpenAI's API returns them: the chat.completion and text_completion bodies, their
 * streamed chunks, logprobs in both endpoints' forms, and the SSE framing.
 */
import type { TextTokenizer } from '../engine/tokenizer.js';
import type { TokenLogprobs } from './backend.js';
import type { Delta } from './generation.js';
import type { CheckedRequest } from './request.js';

export type FinishReason = 'stop' | 'length' | null;

export interface Usage {
  prompt_tokens: number;
  completion_tokens: number;
  total_tokens: number;
  /** OpenAI's field: prompt tokens served from the prefix cache (on the worker that computed the prompt). */
  prompt_tokens_details: { cached_tokens: number };
}

export function usage(request: CheckedRequest, completionTokens: number, cachedTokens = 0): Usage {
  const prompt = request.promptIds.length;
  return {
    prompt_tokens: prompt,
    completion_tokens: completionTokens,
    total_tokens: prompt + completionTokens,
    prompt_tokens_details: { cached_tokens: cachedTokens },
  };
}

/** One server-sent event carrying `data` as JSON. */
export const sseEvent = (data: unknown): string => `data: ${JSON.stringify(data)}\n\n`;
/** The last event of every stream, as OpenAI ends theirs. */
export const SSE_DONE = 'data: [DONE]\n\n';

function utf8Bytes(s: string): number[] {
  return [...Buffer.from(s, 'utf8')];
}

/** OpenAI chat logprobs entries for some tokens. */
function chatLogprobs(tokenizer: TextTokenizer, tokens: readonly TokenLogprobs[], top: number) {
  return tokens.map((t) => {
    const token = tokenizer.decode([t.tokenId]);
    const alternatives = [];
    for (let i = 0; i < Math.min(top, t.topTokenIds.length); i++) {
      const alt = tokenizer.decode([t.topTokenIds[i]!]);
      alternatives.push({ token: alt, logprob: t.topLogprobs[i]!, bytes: utf8Bytes(alt) });
    }
    return { token, logprob: t.logprob, bytes: utf8Bytes(token), top_logprobs: alternatives };
  });
}

/** OpenAI (legacy) completions logprobs for some tokens; `offset` is the text offset of the first. */
function completionLogprobs(tokenizer: TextTokenizer, tokens: readonly TokenLogprobs[], top: number, offset: number) {
  const out = {
    tokens: [] as string[],
    token_logprobs: [] as number[],
    top_logprobs: [] as Record<string, number>[],
    text_offset: [] as number[],
  };
  for (const t of tokens) {
    const token = tokenizer.decode([t.tokenId]);
    out.tokens.push(token);
    out.token_logprobs.push(t.logprob);
    const alternatives: Record<string, number> = {};
    for (let i = 0; i < Math.min(top, t.topTokenIds.length); i++)
      alternatives[tokenizer.decode([t.topTokenIds[i]!])] ??= t.topLogprobs[i]!;
    out.top_logprobs.push(alternatives);
    out.text_offset.push(offset);
    offset += token.length;
  }
  return out;
}

/** The logprobs field of a choice: null unless the request asked for logprobs. */
function logprobsField(
  tokenizer: TextTokenizer,
  request: CheckedRequest,
  tokens: readonly TokenLogprobs[],
  offset = 0,
) {
  if (request.logprobs === undefined) return null;
  return request.endpoint === 'chat'
    ? { content: chatLogprobs(tokenizer, tokens, request.logprobs) }
    : completionLogprobs(tokenizer, tokens, request.logprobs, offset);
}

/** The whole answer of a request that does not stream. */
export function completionBody(
  tokenizer: TextTokenizer,
  modelName: string,
  request: CheckedRequest,
  answer: {
    text: string;
    tokens: readonly TokenLogprobs[];
    finishReason: FinishReason;
    completionTokens: number;
    cachedTokens?: number;
  },
) {
  const base = { id: request.id, created: Math.floor(Date.now() / 1000), model: modelName };
  const logprobs = logprobsField(tokenizer, request, answer.tokens);
  const choice =
    request.endpoint === 'chat'
      ? { index: 0, message: { role: 'assistant', content: answer.text, refusal: null }, logprobs }
      : { index: 0, text: answer.text, logprobs };
  return {
    ...base,
    object: request.endpoint === 'chat' ? 'chat.completion' : 'text_completion',
    choices: [{ ...choice, finish_reason: answer.finishReason }],
    usage: usage(request, answer.completionTokens, answer.cachedTokens),
  };
}

/** The chunks of one streamed answer, in order: `first`, one per delta, `last`, then `usage` if asked. */
export class StreamChunks {
  private readonly created = Math.floor(Date.now() / 1000);
  private readonly chat: boolean;
  /** Text offset of the next delta (completions logprobs). */
  private offset = 0;

  constructor(
    private readonly tokenizer: TextTokenizer,
    private readonly modelName: string,
    private readonly request: CheckedRequest,
  ) {
    this.chat = request.endpoint === 'chat';
  }

  private chunk(choices: Record<string, unknown>[]) {
    return {
      id: this.request.id,
      object: this.chat ? 'chat.completion.chunk' : 'text_completion',
      created: this.created,
      model: this.modelName,
      choices,
      ...(this.request.includeUsage ? { usage: null } : {}),
    };
  }

  /** Chat streams open with the assistant's role; completions have no opening chunk. */
  first() {
    return this.chat
      ? this.chunk([{ index: 0, delta: { role: 'assistant', content: '' }, logprobs: null, finish_reason: null }])
      : undefined;
  }

  /** A delta worth sending: text, or logprobs the request asked for. */
  carries(delta: Delta): boolean {
    return delta.text !== '' || (this.request.logprobs !== undefined && delta.tokens.length > 0);
  }

  delta(delta: Delta) {
    const logprobs = logprobsField(this.tokenizer, this.request, delta.tokens, this.offset);
    this.offset += delta.text.length;
    return this.chunk([
      this.chat
        ? { index: 0, delta: { content: delta.text }, logprobs, finish_reason: null }
        : { index: 0, text: delta.text, logprobs, finish_reason: null },
    ]);
  }

  last(finishReason: FinishReason) {
    return this.chunk([
      this.chat
        ? { index: 0, delta: {}, logprobs: null, finish_reason: finishReason }
        : { index: 0, text: '', logprobs: null, finish_reason: finishReason },
    ]);
  }

  usage(completionTokens: number, cachedTokens = 0) {
    return { ...this.chunk([]), usage: usage(this.request, completionTokens, cachedTokens) };
  }
}

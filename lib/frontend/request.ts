/**
 * Request validation: the schemas of the two completion endpoints and the rules that turn a parsed JSON body
 * into a `CheckedRequest` (token ids within the vocabulary, room in the context, sampling parameters the engine
 * implements). Everything a client can get wrong is refused here with a 400 naming the field, before a worker
 * sees the request.
 *
 * Rules, at their boundaries (test/serve/frontend.validation.test.ts tests each):
 * - prompt: 1 .. contextLength - 1 tokens (a prompt that fills the context leaves no room for a completion);
 *   token ids are integers in [0, vocabSize).
 * - max_tokens (max_completion_tokens): 1 .. contextLength - prompt tokens; default all the room left.
 * - temperature [0, 2]; top_p (0, 1]; top_k -1 (or 0: off) or >= 1; seed a safe integer.
 * - min_tokens (vLLM's): 0 .. max_tokens (or the room left when max_tokens is absent); neither EOS nor a stop
 *   string ends the request before min_tokens tokens.
 * - stop: a string or at most 4 strings, none empty.
 * - presence_penalty and frequency_penalty [-2, 2]; repetition_penalty (vLLM's) > 0 (the engine's penalties).
 * - chat logprobs true with top_logprobs 0 .. 20; completions logprobs 0 .. 5.
 * - stream_options only with stream: true.
 * - Parameters that change the output and that Tandem does not implement (n, best_of, logit_bias,
 *   min_p, echo, suffix, tools, ...) are refused with `unsupported_value` unless at their no-op
 *   value. Fields no rule names are ignored (clients send extras).
 */
import { randomUUID } from 'node:crypto';
import { z } from 'zod';
import type { ChatMessage, TextTokenizer } from '../engine/tokenizer.js';
import type { SamplingParams } from './backend.js';
import type { Endpoint } from './metrics.js';
import { badRequest, HttpError, unsupported } from './errors.js';

/** OpenAI's limits. */
export const MAX_STOP_STRINGS = 4;
export const MAX_TOP_LOGPROBS = 20;
export const MAX_COMPLETION_LOGPROBS = 5;
/** OpenAI's range of temperature. */
export const MAX_TEMPERATURE = 2;

/** What the rules check a request against. */
export interface ServedModel {
  /** The id clients name in `model`. */
  name: string;
  /** Longest prompt plus completion, in tokens. */
  contextLength: number;
  /** Token ids are below this. */
  vocabSize: number;
  tokenizer: TextTokenizer;
}

/** A request both endpoints resolve to, once checked: what the backend gets and how to answer. */
export interface CheckedRequest {
  endpoint: Endpoint;
  id: string;
  promptIds: number[];
  sampling: SamplingParams;
  stop: string[];
  stream: boolean;
  includeUsage: boolean;
  /** Chat: top_logprobs count when logprobs was asked; completions: the logprobs count. */
  logprobs: number | undefined;
}

// ---- schemas: types and ranges -------------------------------------------------------------------------------

const int = () => z.number().int().refine(Number.isSafeInteger, 'must be a safe integer');
const optional = <T extends z.ZodType>(t: T) => t.nullish();

const TextPart = z.looseObject({ type: z.literal('text'), text: z.string() });
const ChatMessageSchema = z.looseObject({
  role: z.enum(['system', 'developer', 'user', 'assistant', 'tool']),
  content: z
    .union([z.string(), z.array(z.looseObject({ type: z.string() }))], {
      error: 'must be a string or a list of content parts',
    })
    .nullish(),
  name: z.string().optional(),
});

const SamplingFields = {
  model: z.string(),
  stream: optional(z.boolean()),
  stream_options: optional(z.looseObject({ include_usage: optional(z.boolean()) })),
  temperature: optional(z.number().min(0).max(MAX_TEMPERATURE)),
  top_p: optional(z.number().gt(0).max(1)),
  /** vLLM's extension: -1 or 0 keeps every token. */
  top_k: optional(int().min(-1)),
  seed: optional(int()),
  max_tokens: optional(int().min(1)),
  stop: optional(
    z.union([z.string(), z.array(z.string()).max(MAX_STOP_STRINGS)], {
      error: `must be a string or a list of at most ${MAX_STOP_STRINGS} strings`,
    }),
  ),
  /** vLLM's extension: generate past EOS, up to max_tokens. */
  ignore_eos: optional(z.boolean()),
  /** vLLM's extension: no stop (EOS, stop string) ends the request before this many tokens. */
  min_tokens: optional(int().min(0)),
  user: optional(z.string()),
  presence_penalty: optional(z.number().min(-2).max(2)),
  frequency_penalty: optional(z.number().min(-2).max(2)),
  /** vLLM's extension. */
  repetition_penalty: optional(z.number().gt(0)),
  // Not implemented: typed here so that a wrong type is invalid_value, refused below unless a no-op.
  n: optional(int().min(1)),
  logit_bias: optional(z.record(z.string(), z.number())),
  min_p: optional(z.number().min(0).max(1)),
  use_beam_search: optional(z.boolean()),
};

const ChatRequestSchema = z.looseObject({
  ...SamplingFields,
  messages: z.array(ChatMessageSchema).min(1),
  max_completion_tokens: optional(int().min(1)),
  logprobs: optional(z.boolean()),
  top_logprobs: optional(int().min(0).max(MAX_TOP_LOGPROBS)),
  tools: optional(z.array(z.unknown())),
  response_format: optional(z.looseObject({ type: z.string() })),
});

const TokenIds = z.array(int().min(0));
const CompletionRequestSchema = z.looseObject({
  ...SamplingFields,
  prompt: z.union([z.string(), z.array(z.string()), TokenIds, z.array(TokenIds)], {
    error: 'must be a string, a list of strings, a list of token ids or a list of lists of token ids',
  }),
  logprobs: optional(int().min(0).max(MAX_COMPLETION_LOGPROBS)),
  echo: optional(z.boolean()),
  suffix: optional(z.string()),
  best_of: optional(int().min(1)),
});

type ChatRequest = z.output<typeof ChatRequestSchema>;
type CompletionRequest = z.output<typeof CompletionRequestSchema>;
type CommonRequest = ChatRequest | CompletionRequest;

function parseBody<S extends z.ZodType>(schema: S, body: unknown): z.output<S> {
  if (body === null || typeof body !== 'object' || Array.isArray(body))
    throw badRequest('the request body must be a JSON object');
  const result = schema.safeParse(body);
  if (result.success) return result.data;
  const issue = result.error.issues[0]!;
  const param = issue.path
    .map((k) => (typeof k === 'number' ? `[${k}]` : String(k)))
    .join('.')
    .replace(/\.\[/g, '[');
  const missing = issue.code === 'invalid_type' && /received undefined/.test(issue.message);
  throw badRequest(`${param || 'body'}: ${missing ? 'is required' : issue.message}`, param || null);
}

// ---- rules ---------------------------------------------------------------------------------------------------

/** Parameters Tandem does not implement, each with the test for its no-op value (null and absent are no-ops). */
const NOT_IMPLEMENTED: [param: string, isNoOp: (value: unknown) => boolean, noOp: string][] = [
  ['n', (v) => v === 1, 'n=1'],
  ['best_of', (v) => v === 1, 'best_of=1'],
  ['min_p', (v) => v === 0, '0'],
  ['logit_bias', (v) => Object.keys(v as object).length === 0, 'an empty object'],
  ['use_beam_search', (v) => v === false, 'false'],
  ['echo', (v) => v === false, 'false'],
  ['suffix', (v) => v === '', 'empty'],
  ['tools', (v) => (v as unknown[]).length === 0, 'an empty list'],
  ['response_format', (v) => (v as { type: string }).type === 'text', '{"type": "text"}'],
];

/** The rules on parameters alone, checked before the prompt is tokenized (the costly part). */
function checkParameters(body: CommonRequest): void {
  for (const [param, isNoOp, noOp] of NOT_IMPLEMENTED) {
    const value = (body as Record<string, unknown>)[param];
    if (value != null && !isNoOp(value)) throw unsupported(`${param} is not supported (only ${noOp})`, param);
  }
  if (!body.stream && body.stream_options != null)
    throw badRequest('stream_options is only allowed with stream: true', 'stream_options');
  if (Array.isArray(body.stop) ? body.stop.some((s) => s.length === 0) : body.stop === '')
    throw badRequest('stop strings must not be empty', 'stop');
}

function checkModel(model: ServedModel, name: string): void {
  if (name !== model.name)
    throw new HttpError(
      404,
      `The model '${name}' does not exist (this server serves '${model.name}')`,
      'not_found_error',
      'model',
      'model_not_found',
    );
}

/** Checks the prompt against the model and fills in the sampling parameters. */
function checkPrompt(
  model: ServedModel,
  endpoint: Endpoint,
  body: CommonRequest,
  promptIds: number[],
  maxTokens: { value: number | null | undefined; param: string },
  logprobs: number | undefined,
): CheckedRequest {
  const limit = model.contextLength;
  const promptParam = endpoint === 'chat' ? 'messages' : 'prompt';
  if (promptIds.length === 0) throw badRequest('the prompt is empty', promptParam);
  for (let i = 0; i < promptIds.length; i++) {
    const id = promptIds[i]!;
    if (id >= model.vocabSize)
      throw badRequest(
        `token id ${id} (prompt position ${i}) is out of the vocabulary (ids 0 .. ${model.vocabSize - 1})`,
        promptParam,
      );
  }
  if (promptIds.length >= limit)
    throw badRequest(
      `This model's maximum context length is ${limit} tokens. However, your prompt is ${promptIds.length} tokens, ` +
        `which leaves no room for a completion.`,
      promptParam,
      'context_length_exceeded',
    );
  const room = limit - promptIds.length;
  if (maxTokens.value != null && maxTokens.value > room)
    throw badRequest(
      `This model's maximum context length is ${limit} tokens. However, you requested ` +
        `${promptIds.length + maxTokens.value} tokens (${promptIds.length} in the prompt, ${maxTokens.value} in the ` +
        `completion). Please reduce the prompt or the completion length.`,
      maxTokens.param,
      'context_length_exceeded',
    );
  const sampling: SamplingParams = {
    temperature: body.temperature ?? 1,
    topP: body.top_p ?? 1,
    maxTokens: maxTokens.value ?? room,
    stopTokenIds: body.ignore_eos ? [] : model.tokenizer.eosIds,
  };
  if (body.min_tokens != null && body.min_tokens > sampling.maxTokens!)
    throw badRequest(
      `min_tokens (${body.min_tokens}) must not exceed ${maxTokens.value != null ? maxTokens.param : 'the room left in the context'} (${sampling.maxTokens})`,
      'min_tokens',
    );
  if (body.min_tokens) sampling.minTokens = body.min_tokens;
  if (body.top_k != null && body.top_k > 0) sampling.topK = body.top_k;
  if (body.seed != null) sampling.seed = body.seed;
  if (body.presence_penalty) sampling.presencePenalty = body.presence_penalty;
  if (body.frequency_penalty) sampling.frequencyPenalty = body.frequency_penalty;
  if (body.repetition_penalty != null && body.repetition_penalty !== 1)
    sampling.repetitionPenalty = body.repetition_penalty;
  if (logprobs !== undefined) sampling.logprobs = logprobs;
  return {
    endpoint,
    id: `${endpoint === 'chat' ? 'chatcmpl' : 'cmpl'}-${randomUUID().replace(/-/g, '')}`,
    promptIds,
    sampling,
    stop: body.stop == null ? [] : typeof body.stop === 'string' ? [body.stop] : body.stop,
    stream: body.stream ?? false,
    includeUsage: body.stream_options?.include_usage ?? false,
    logprobs,
  };
}

/** A parsed body of POST /v1/chat/completions, checked; throws an HttpError naming the field. */
export function checkChatRequest(model: ServedModel, json: unknown): CheckedRequest {
  const body = parseBody(ChatRequestSchema, json);
  checkModel(model, body.model);
  checkParameters(body);
  if (body.top_logprobs != null && !body.logprobs)
    throw badRequest('top_logprobs needs logprobs: true', 'top_logprobs');
  if (body.max_tokens != null && body.max_completion_tokens != null)
    throw badRequest('set max_tokens or max_completion_tokens, not both', 'max_tokens');
  const messages: ChatMessage[] = body.messages.map((m, i) => {
    if (m.content == null) return { role: m.role, content: '' };
    if (typeof m.content === 'string') return { role: m.role, content: m.content };
    return {
      role: m.role,
      content: m.content
        .map((part, j) => {
          const text = TextPart.safeParse(part);
          if (!text.success)
            throw unsupported(
              `messages[${i}].content[${j}]: only text content parts are supported`,
              `messages[${i}].content[${j}]`,
            );
          return text.data.text;
        })
        .join(''),
    };
  });
  // The template puts BOS in where the model wants it; encoding must not add a second one.
  const prompt = model.tokenizer.applyChatTemplate(messages, { addGenerationPrompt: true });
  const promptIds = model.tokenizer.encode(prompt, { addBos: false });
  const maxParam = body.max_completion_tokens != null ? 'max_completion_tokens' : 'max_tokens';
  return checkPrompt(
    model,
    'chat',
    body,
    promptIds,
    { value: body.max_completion_tokens ?? body.max_tokens, param: maxParam },
    body.logprobs ? (body.top_logprobs ?? 0) : undefined,
  );
}

/** A parsed body of POST /v1/completions, checked; throws an HttpError naming the field. */
export function checkCompletionRequest(model: ServedModel, json: unknown): CheckedRequest {
  const body = parseBody(CompletionRequestSchema, json);
  checkModel(model, body.model);
  checkParameters(body);
  const p = body.prompt;
  let promptIds: number[];
  if (typeof p === 'string') promptIds = model.tokenizer.encode(p);
  else if (p.length === 0) throw badRequest('the prompt is empty', 'prompt');
  else if (p.length > 1 && typeof p[0] !== 'number') throw unsupported('one prompt per request is supported', 'prompt');
  else if (typeof p[0] === 'string') promptIds = model.tokenizer.encode(p[0]);
  else if (typeof p[0] === 'number') promptIds = [...(p as number[])];
  else promptIds = [...(p[0] as number[])];
  return checkPrompt(
    model,
    'completions',
    body,
    promptIds,
    { value: body.max_tokens, param: 'max_tokens' },
    body.logprobs ?? undefined,
  );
}

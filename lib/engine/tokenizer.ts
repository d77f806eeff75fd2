/**
 * Text <-> token ids for the engine and the frontend: a Hugging Face `tokenizer.json` (through
 * @huggingface/tokenizers) with its chat template (through @huggingface/jinja), or the byte-level
 * tokenizer of `dummy:` models. Workers get token ids; only the frontend and `tandem generate` see text.
 */
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { Template } from '@huggingface/jinja';
import { Tokenizer } from '@huggingface/tokenizers';
import { ModelConfigError } from '../errors.js';
import { ByteTokenizer } from './model/tokenizer-bytes.js';
import { dummyTokenizer, isDummyModel } from './model/dummy.js';
import type { ModelConfig } from './model/config.js';

export interface ChatMessage {
  role: string;
  content: string;
}

/** Turns a growing list of generated ids into text pieces, never splitting a character. */
export interface StreamDecoder {
  push(ids: number | readonly number[]): string;
  flush(): string;
}

export interface TextTokenizer {
  readonly bosId: number | null;
  readonly eosIds: readonly number[];
  /** Token ids of `text`; `addBos` (default true) puts the BOS id first where the model has one. */
  encode(text: string, options?: { addBos?: boolean }): number[];
  /** Text of `ids`, special tokens left out. */
  decode(ids: readonly number[]): string;
  decoder(): StreamDecoder;
  /** The prompt text for a chat, as the model's template renders it (it includes BOS when the template does). */
  applyChatTemplate(messages: readonly ChatMessage[], options?: { addGenerationPrompt?: boolean }): string;
}

/** A minimal template for models that ship none (dummy models): role-tagged turns. */
const FALLBACK_TEMPLATE =
  "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}" +
  '{% if add_generation_prompt %}<|assistant|>\n{% endif %}';

function tokenText(v: unknown): string | undefined {
  if (typeof v === 'string') return v;
  if (v && typeof v === 'object' && typeof (v as { content?: unknown }).content === 'string')
    return (v as { content: string }).content;
  return undefined;
}

function readJson(path: string): Record<string, unknown> {
  try {
    return JSON.parse(readFileSync(path, 'utf8')) as Record<string, unknown>;
  } catch (error) {
    throw new ModelConfigError(`${path}: cannot be read as JSON (${(error as Error).message})`);
  }
}

class HfTextTokenizer implements TextTokenizer {
  readonly bosId: number | null;
  readonly eosIds: readonly number[];
  private readonly special: Set<number>;

  constructor(
    private readonly tokenizer: Tokenizer,
    private readonly template: Template,
    private readonly bosToken: string | undefined,
    private readonly eosToken: string | undefined,
    eosIds: readonly number[],
    private readonly addsBos: boolean,
  ) {
    const id = (t: string | undefined) => (t === undefined ? undefined : tokenizer.token_to_id(t));
    this.bosId = id(bosToken) ?? null;
    this.eosIds = eosIds.length ? eosIds : [id(eosToken)].filter((x): x is number => x !== undefined);
    this.special = new Set([this.bosId, ...this.eosIds].filter((x): x is number => x !== null));
  }

  encode(text: string, options: { addBos?: boolean } = {}): number[] {
    const ids = [...this.tokenizer.encode(text, { add_special_tokens: false }).ids];
    if ((options.addBos ?? this.addsBos) && this.bosId !== null && ids[0] !== this.bosId) ids.unshift(this.bosId);
    return ids;
  }

  decode(ids: readonly number[]): string {
    const text = ids.filter((id) => !this.special.has(id));
    // Only special tokens (an EOS among the top logprobs): no text. The library throws on an empty list.
    if (text.length === 0) return '';
    return this.tokenizer.decode(text, { skip_special_tokens: true });
  }

  decoder(): StreamDecoder {
    // Decode everything so far and emit what is new; hold back a trailing replacement character, which
    // is an incomplete multi-byte character until its next byte arrives.
    const ids: number[] = [];
    let emitted = 0;
    const next = (final: boolean) => {
      const text = this.decode(ids);
      const stable = final ? text.length : text.endsWith('\uFFFD') ? text.lastIndexOf('\uFFFD') : text.length;
      if (stable <= emitted) return '';
      const piece = text.slice(emitted, stable);
      emitted = stable;
      return piece;
    };
    return {
      push: (id) => {
        if (typeof id === 'number') ids.push(id);
        else ids.push(...id);
        return next(false);
      },
      flush: () => next(true),
    };
  }

  applyChatTemplate(messages: readonly ChatMessage[], options: { addGenerationPrompt?: boolean } = {}): string {
    return this.template.render({
      messages,
      add_generation_prompt: options.addGenerationPrompt ?? true,
      bos_token: this.bosToken ?? '',
      eos_token: this.eosToken ?? '',
    });
  }
}

class DummyTextTokenizer implements TextTokenizer {
  readonly bosId: number | null;
  readonly eosIds: readonly number[];
  private readonly template = new Template(FALLBACK_TEMPLATE);

  constructor(private readonly bytes: ByteTokenizer) {
    this.bosId = bytes.bosId ?? null;
    this.eosIds = bytes.eosId === undefined ? [] : [bytes.eosId];
  }

  encode(text: string, options: { addBos?: boolean } = {}): number[] {
    return this.bytes.encode(text, { addBos: options.addBos ?? true });
  }
  decode(ids: readonly number[]): string {
    return this.bytes.decode(ids);
  }
  decoder(): StreamDecoder {
    return this.bytes.decoder();
  }
  applyChatTemplate(messages: readonly ChatMessage[], options: { addGenerationPrompt?: boolean } = {}): string {
    return this.template.render({ messages, add_generation_prompt: options.addGenerationPrompt ?? true });
  }
}

/** The byte-level tokenizer of `dummy:` models, with a plain role-tagged chat template. */
export function byteTextTokenizer(bytes = new ByteTokenizer()): TextTokenizer {
  return new DummyTextTokenizer(bytes);
}

/**
 * Loads `tokenizer.json` (and `tokenizer_config.json`, `chat_template.jinja` where present) from a model
 * directory. `eosIds` (from config.json) add to the tokenizer's own EOS. Throws ModelConfigError naming
 * the file when something is missing or malformed.
 */
export function loadTokenizer(dir: string, eosIds: readonly number[] = []): TextTokenizer {
  const tokenizerPath = join(dir, 'tokenizer.json');
  if (!existsSync(tokenizerPath))
    throw new ModelConfigError(`${tokenizerPath}: not found (the model directory needs a tokenizer.json)`);
  const configPath = join(dir, 'tokenizer_config.json');
  const config = existsSync(configPath) ? readJson(configPath) : {};
  let tokenizer: Tokenizer;
  try {
    tokenizer = new Tokenizer(readJson(tokenizerPath) as never, config as never);
  } catch (error) {
    throw new ModelConfigError(`${tokenizerPath}: not a tokenizer this version reads (${(error as Error).message})`);
  }
  const jinjaPath = join(dir, 'chat_template.jinja');
  let source: string | undefined;
  if (existsSync(jinjaPath)) source = readFileSync(jinjaPath, 'utf8');
  else if (typeof config.chat_template === 'string') source = config.chat_template;
  else if (Array.isArray(config.chat_template)) {
    const named = (config.chat_template as { name?: string; template?: string }[]).find((t) => t.name === 'default');
    source = named?.template;
  }
  let template: Template;
  try {
    template = new Template(source ?? FALLBACK_TEMPLATE);
  } catch (error) {
    throw new ModelConfigError(
      `${existsSync(jinjaPath) ? jinjaPath : configPath}: chat template does not parse (${(error as Error).message})`,
    );
  }
  const addsBos = config.add_bos_token === undefined ? true : Boolean(config.add_bos_token);
  return new HfTextTokenizer(
    tokenizer,
    template,
    tokenText(config.bos_token),
    tokenText(config.eos_token),
    eosIds,
    addsBos,
  );
}

/**
 * The tokenizer of a model: a dummy model's byte-level tokenizer sized to its vocabulary (so every id it can
 * emit decodes), or the checkpoint's tokenizer.json.
 */
export function modelTokenizer(model: string, config: ModelConfig): TextTokenizer {
  return isDummyModel(model) ? byteTextTokenizer(dummyTokenizer(config)) : loadTokenizer(model, config.eosTokenIds);
}

/**
 * Prompts of an exact length in the model's own tokens. A prompt is random common English words, cut in token
 * space and checked by encoding the request as the server will (completions: the text with the model's BOS;
 * chat: the chat template rendered around the text, encoded without another BOS, as lib/frontend does), then
 * nudged until the count is the one asked for. With the byte tokenizer of `dummy:` models that is exact at
 * once; with a BPE tokenizer it takes a few rounds.
 *
 * Shared prefixes and trace blocks are texts of an exact token count that later words never merge into: each
 * piece starts with a space before a word, which the pre-tokenizers of BPE models split on.
 */
import { randomInt } from 'd3-random';
import type { TextTokenizer } from '../engine/tokenizer.js';

export const PROMPT_APIS = ['completions', 'chat'] as const;
export type PromptApi = (typeof PROMPT_APIS)[number];

/** Common English words, each one token in most BPE vocabularies. */
const WORDS = (
  'the of and to in is you that it he was for on are as with his they at be this have from or one had by word ' +
  'but not what all were we when your can said there use an each which she do how their if will up other about ' +
  'out many then them these so some her would make like him into time has look two more write go see number no ' +
  'way could people my than first water been call who oil its now find long down day did get come made may part ' +
  'over new sound take only little work know place year live me back give most very after thing our just name ' +
  'good sentence man think say great where help through much before line right too mean old any same tell boy ' +
  'follow came want show also around form three small set put end does another well large must big even such ' +
  'because turn here why ask went men read need land different home us move try kind hand picture again change ' +
  'off play spell air away animal house point page letter mother answer found study still learn should world'
).split(' ');

/** Rounds of nudging before settling for the closest count (a tokenizer that merges across every cut). */
const MAX_FIT_ROUNDS = 12;

export interface FittedPrompt {
  /** The text to send: the user message (chat) or the prompt (completions). */
  text: string;
  /** Its prompt tokens as the server counts them; the length asked for unless it could not be reached. */
  tokens: number;
}

/**
 * `a` then `b`, with a space between them unless one is there: a tokenizer whose decode drops the leading space
 * (SentencePiece) must not glue the first word of `b` onto the last of `a`.
 */
export function joinText(a: string, b: string): string {
  return a && b && !/\s$/.test(a) && !/^\s/.test(b) ? `${a} ${b}` : a + b;
}

export class PromptFactory {
  /** Prompt tokens of an empty request: BOS, or the chat template's own tokens. */
  readonly overhead: number;

  constructor(
    readonly tokenizer: TextTokenizer,
    readonly api: PromptApi,
  ) {
    this.overhead = this.count('');
  }

  /** Prompt tokens of a request with this text, as the server counts them. */
  count(text: string): number {
    const t = this.tokenizer;
    if (this.api === 'completions') return t.encode(text).length;
    return t.encode(t.applyChatTemplate([{ role: 'user', content: text }], { addGenerationPrompt: true }), {
      addBos: false,
    }).length;
  }

  /** Random words, at least `minTokens` tokens of them, starting with a space. */
  words(minTokens: number, source: () => number): string {
    const pick = randomInt.source(source)(WORDS.length);
    let text = '';
    // Every word is at least one token and at most a few bytes: grow by the shortfall until long enough.
    for (let need = minTokens; need > 0;) {
      const parts: string[] = [];
      for (let i = 0; i < need; i++) parts.push(WORDS[pick()]!);
      text += ' ' + parts.join(' ');
      need = minTokens - this.tokenizer.encode(text, { addBos: false }).length;
    }
    return text;
  }

  /** A text of exactly `n` tokens on its own (no BOS), for a shared prefix or a trace block. */
  piece(n: number, source: () => number): string {
    const ids = this.tokenizer.encode(this.words(n + 8, source), { addBos: false });
    let take = n;
    let best = '';
    for (let round = 0; round < MAX_FIT_ROUNDS; round++) {
      const text = this.tokenizer.decode(ids.slice(0, take));
      const got = this.tokenizer.encode(text, { addBos: false }).length;
      best = text;
      if (got === n) break;
      take = Math.max(0, Math.min(ids.length, take + n - got));
    }
    return best;
  }

  /**
   * A request text of exactly `total` prompt tokens: `prefix`, then `lead` (text that requests sharing it must
   * share, e.g. a trace's last block), then random words, cut to length. Below the minimum (the prefix and
   * the template alone) the prompt is the prefix, with its count.
   */
  fit(total: number, source: () => number, prefix = '', lead = ''): FittedPrompt {
    const base = this.count(prefix);
    const body = this.tokenizer.encode(joinText(lead, this.words(Math.max(0, total - base) + 8, source)), {
      addBos: false,
    });
    let take = Math.max(0, total - base);
    let best: FittedPrompt = { text: prefix, tokens: base };
    const seen = new Set<number>();
    for (let round = 0; round < MAX_FIT_ROUNDS && !seen.has(take); round++) {
      seen.add(take);
      const text = joinText(prefix, this.tokenizer.decode(body.slice(0, take)));
      const tokens = this.count(text);
      if (Math.abs(tokens - total) < Math.abs(best.tokens - total)) best = { text, tokens };
      if (tokens === total) break;
      take = Math.max(0, Math.min(body.length, take + total - tokens));
    }
    return best;
  }
}

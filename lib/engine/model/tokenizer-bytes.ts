/**
 * Byte-level tokenizer for dummy models: ids 0..255 are the UTF-8 bytes of the text, 256 is BOS, 257 is EOS.
 * A large dummy preset keeps its real vocabulary: each id beyond those decodes to one printable ASCII
 * character ('!' + (id - 256) % 94), so that its gibberish streams as text token by token, as a real model's
 * would (benchmarks time the stream's text; ids that decoded to nothing left a stream without any).
 */
import { BadArgumentError } from '../../errors.js';

export const BYTE_BOS_ID = 256;
export const BYTE_EOS_ID = 257;
/** 256 bytes + BOS + EOS. */
export const BYTE_VOCAB_SIZE = 258;
/** Ids past the bytes, BOS and EOS decode to one of the printable ASCII characters '!' .. '~'. */
const PLACEHOLDER_FIRST = 0x21;
const PLACEHOLDER_COUNT = 94;

export interface ByteTokenizerOptions {
  bosId?: number;
  eosId?: number;
  /** Ids below this are valid; those above 255 other than BOS and EOS decode to a placeholder. Default 258. */
  vocabSize?: number;
}

export interface EncodeOptions {
  /** Prepend BOS (default true, as Llama tokenizers do). */
  addBos?: boolean;
}

export class ByteTokenizer {
  readonly bosId: number;
  readonly eosId: number;
  readonly vocabSize: number;

  constructor(options: ByteTokenizerOptions = {}) {
    this.bosId = options.bosId ?? BYTE_BOS_ID;
    this.eosId = options.eosId ?? BYTE_EOS_ID;
    this.vocabSize = options.vocabSize ?? BYTE_VOCAB_SIZE;
    for (const [what, id] of [
      ['bosId', this.bosId],
      ['eosId', this.eosId],
    ] as const)
      if (!Number.isSafeInteger(id) || id < 256 || id >= this.vocabSize)
        throw new BadArgumentError(`${what} ${id} must be in 256..${this.vocabSize - 1} (0..255 are bytes)`);
  }

  /** UTF-8 bytes of `text` as ids, after BOS unless `addBos: false`. */
  encode(text: string, options: EncodeOptions = {}): number[] {
    const bytes = Buffer.from(text, 'utf8');
    const ids: number[] = options.addBos === false ? [] : [this.bosId];
    for (const b of bytes) ids.push(b);
    return ids;
  }

  /** True for BOS and EOS: they decode to nothing. */
  isSpecial(id: number): boolean {
    return id === this.bosId || id === this.eosId;
  }

  /** The text of `ids`, special ids skipped; invalid UTF-8 becomes U+FFFD. */
  decode(ids: Iterable<number>): string {
    const d = this.decoder();
    return d.push(ids) + d.flush();
  }

  /** An incremental decoder for streaming output. */
  decoder(): ByteStreamDecoder {
    return new ByteStreamDecoder(this);
  }
}

/**
 * Decodes ids as they arrive. A multibyte UTF-8 character split over several pushes is held back until it is
 * complete, so every returned piece is whole text; `flush()` ends the stream (a dangling partial sequence
 * becomes U+FFFD).
 */
export class ByteStreamDecoder {
  private readonly utf8 = new TextDecoder('utf-8', { fatal: false, ignoreBOM: true });

  constructor(private readonly tokenizer: ByteTokenizer) {}

  push(ids: number | Iterable<number>): string {
    const list = typeof ids === 'number' ? [ids] : ids;
    const bytes: number[] = [];
    for (const id of list) {
      if (!Number.isSafeInteger(id) || id < 0 || id >= this.tokenizer.vocabSize)
        throw new BadArgumentError(`token id ${id} is outside the vocabulary (0..${this.tokenizer.vocabSize - 1})`);
      if (id < 256) bytes.push(id);
      else if (!this.tokenizer.isSpecial(id)) bytes.push(PLACEHOLDER_FIRST + ((id - 256) % PLACEHOLDER_COUNT));
    }
    if (bytes.length === 0) return '';
    return this.utf8.decode(Uint8Array.from(bytes), { stream: true });
  }

  flush(): string {
    return this.utf8.decode();
  }
}

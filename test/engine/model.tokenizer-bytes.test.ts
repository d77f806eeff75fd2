import { describe, expect, it } from 'vitest';
import { BadArgumentError } from '../../lib/errors.js';
import { BYTE_BOS_ID, BYTE_EOS_ID, ByteTokenizer, dummyConfig, dummyTokenizer } from '../../lib/engine/model/index.js';

const tok = new ByteTokenizer();

describe('ByteTokenizer', () => {
  it('encodes UTF-8 bytes after BOS, or without it', () => {
    expect(tok.encode('Hi')).toEqual([BYTE_BOS_ID, 72, 105]);
    expect(tok.encode('Hi', { addBos: false })).toEqual([72, 105]);
    expect(tok.encode('é€', { addBos: false })).toEqual([0xc3, 0xa9, 0xe2, 0x82, 0xac]);
    expect(tok.encode('')).toEqual([BYTE_BOS_ID]);
  });

  it('decodes back, skipping BOS and EOS', () => {
    const text = 'Tandem: prefill → decode, 日本語, 👍🏽 and \u0000 nul';
    const ids = tok.encode(text);
    expect(ids.every((id) => id >= 0 && id < 258)).toBe(true);
    expect(tok.decode(ids)).toBe(text);
    expect(tok.decode([...ids, BYTE_EOS_ID])).toBe(text);
    expect(tok.decode([72, BYTE_EOS_ID, 105])).toBe('Hi');
    expect(tok.isSpecial(BYTE_BOS_ID) && tok.isSpecial(BYTE_EOS_ID) && !tok.isSpecial(255)).toBe(true);
  });

  it('invalid UTF-8 becomes U+FFFD; ids outside the vocabulary throw', () => {
    expect(tok.decode([0xff, 65])).toBe('\uFFFDA');
    expect(() => tok.decode([258])).toThrow(BadArgumentError);
    expect(() => tok.decode([-1])).toThrow(BadArgumentError);
    expect(() => new ByteTokenizer({ bosId: 10 })).toThrow(BadArgumentError);
  });

  it('streams a multibyte emoji split across pushes without emitting partial characters', () => {
    const text = 'ok 👍🏽!';
    const ids = tok.encode(text, { addBos: false });
    const d = tok.decoder();
    const pieces = ids.map((id) => d.push(id));
    pieces.push(d.flush());
    expect(pieces.join('')).toBe(text);
    expect(pieces.some((p) => p.includes('\uFFFD'))).toBe(false);
    // 'o', 'k', ' ' come out at once; the 4-byte thumbs-up only with its last byte, then the 4-byte skin tone
    expect(pieces.slice(0, 3)).toEqual(['o', 'k', ' ']);
    expect(pieces.slice(3, 7)).toEqual(['', '', '', '👍']);
    expect(pieces.slice(7, 11)).toEqual(['', '', '', '🏽']);
    expect(pieces[11]).toBe('!');
  });

  it('streams chunks that split characters anywhere, with specials interleaved', () => {
    const text = 'añ€😀z';
    const ids = tok.encode(text, { addBos: false });
    for (let cut1 = 0; cut1 <= ids.length; cut1++)
      for (let cut2 = cut1; cut2 <= ids.length; cut2++) {
        const d = tok.decoder();
        const out =
          d.push([BYTE_BOS_ID, ...ids.slice(0, cut1)]) +
          d.push(ids.slice(cut1, cut2)) +
          d.push([BYTE_EOS_ID]) +
          d.push(ids.slice(cut2)) +
          d.flush();
        expect(out).toBe(text);
      }
  });

  it('flush turns a dangling partial character into U+FFFD', () => {
    const d = tok.decoder();
    expect(d.push([0xf0, 0x9f])).toBe('');
    expect(d.flush()).toBe('\uFFFD');
    expect(d.push(65)).toBe('A');
  });

  it('a large dummy preset accepts its whole vocabulary; each id past the bytes decodes to one printable character', () => {
    const big = dummyTokenizer(dummyConfig('llama-3.1-8b'));
    expect(big.vocabSize).toBe(128256);
    // '!' + (id - 256) % 94: 1000 -> 744 % 94 = 86 -> 'w'; 128255 -> 127999 % 94 = 65 -> 'b'; BOS and EOS: nothing.
    expect(big.decode([72, 1000, 256, 128255, 257, 105])).toBe('Hwbi');
    const d = big.decoder();
    expect([350, 349, 444].map((id) => d.push(id))).toEqual(['!', '~', '!']);
    expect(() => big.decode([128256])).toThrow(BadArgumentError);
  });
});

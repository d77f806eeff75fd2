import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { loadTrace, parseTrace, TraceFormatError } from '../../lib/bench/trace.js';

// Mooncake's JSONL request traces: good lines parse, every bad one is a TraceFormatError naming the file,
// the line number and the field.
const GOOD = [
  '{"timestamp": 0, "input_length": 6955, "output_length": 52, "hash_ids": [46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59]}',
  '{"timestamp": 27482, "input_length": 6472, "output_length": 26, "hash_ids": [46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 60]}',
  '',
  '{"timestamp": 3000, "input_length": 100, "output_length": 10, "extra": "ignored"}',
].join('\n');

function thrown(text: string): TraceFormatError {
  try {
    parseTrace(text, 'mooncake.jsonl');
  } catch (error) {
    expect(error).toBeInstanceOf(TraceFormatError);
    return error as TraceFormatError;
  }
  throw new Error('the trace parsed');
}

describe('Mooncake traces', () => {
  it('parses records in arrival order, skipping blank lines; hash_ids optional', () => {
    const trace = parseTrace(GOOD);
    expect(trace.map((r) => [r.line, r.timestampMs, r.inputLength, r.outputLength, r.hashIds.length])).toEqual([
      [1, 0, 6955, 52, 14],
      [4, 3000, 100, 10, 0],
      [2, 27482, 6472, 26, 13],
    ]);
  });

  it('bad lines: the file, the line number and what is wrong', () => {
    const lines = GOOD.split('\n');
    const at = (n: number, line: string) => {
      const copy = [...lines];
      copy.splice(n - 1, 0, line);
      return thrown(copy.join('\n'));
    };
    let e = at(3, '{"timestamp": 10, "input_length": 5,');
    expect(e.message).toMatch(/^mooncake\.jsonl:3: not JSON \(/);
    expect({ code: e.code, line: e.line, source: e.source }).toEqual({
      code: 'TANDEM_BAD_TRACE',
      line: 3,
      source: 'mooncake.jsonl',
    });
    expect(at(2, '{"timestamp": 10, "output_length": 5}').message).toBe('mooncake.jsonl:2: input_length: is required');
    expect(at(5, '{"timestamp": 10, "input_length": 0, "output_length": 5}').message).toMatch(
      /^mooncake\.jsonl:5: input_length: /,
    );
    expect(at(1, '{"timestamp": 10, "input_length": 5, "output_length": 2.5}').message).toMatch(
      /^mooncake\.jsonl:1: output_length: /,
    );
    expect(at(1, '{"timestamp": -1, "input_length": 5, "output_length": 2}').message).toMatch(
      /^mooncake\.jsonl:1: timestamp: /,
    );
    expect(at(2, '{"timestamp": "0", "input_length": 5, "output_length": 2}').message).toMatch(
      /^mooncake\.jsonl:2: timestamp: /,
    );
    expect(at(4, '{"timestamp": 1, "input_length": 5, "output_length": 2, "hash_ids": [1, "2"]}').message).toMatch(
      /^mooncake\.jsonl:4: hash_ids\[1\]: /,
    );
    expect(at(2, '[1, 2, 3]').message).toBe('mooncake.jsonl:2: not a JSON object');
    expect(at(2, 'null').message).toBe('mooncake.jsonl:2: not a JSON object');
  });

  it('a trace with no requests, or a file that cannot be read, is refused too', () => {
    expect(thrown('\n\n  \n').message).toBe('mooncake.jsonl: the trace has no requests');
    const dir = mkdtempSync(join(tmpdir(), 'tandem-trace-'));
    expect(() => loadTrace(join(dir, 'missing.jsonl'))).toThrow(/missing\.jsonl: cannot read: ENOENT/);
    writeFileSync(join(dir, 'one.jsonl'), '{"timestamp": 5, "input_length": 3, "output_length": 1}\n');
    expect(loadTrace(join(dir, 'one.jsonl'))).toEqual([
      { line: 1, timestampMs: 5, inputLength: 3, outputLength: 1, hashIds: [] },
    ]);
  });
});

import { describe, expect, it } from 'vitest';
import { transferChart, type TransferChartRow } from '../../bench/chart.js';
import { powerOfTwoTicks, renderSvg } from '../../lib/bench/chart.js';

// bench:transfer's and bench:engine's charts, to the standard of lib/bench/chart.ts, on synthetic rows: bytes in
// KiB / MiB, a log axis where GB/s span decades, whole legend labels, one panel per path against its baseline.

const row = (path: string, pieceBytes: number, pieces: number, gbps: number): TransferChartRow => ({
  section: 'host',
  path,
  op: 'WRITE',
  memory: 'shared->shared',
  pieceBytes,
  pieces,
  bytes: pieceBytes * pieces,
  gbps,
  baseline: 'memcpy',
  vsBaseline: 0.8,
});

describe('bench:transfer chart', () => {
  const rows: TransferChartRow[] = [
    row('shm', 4096, 1, 0.09),
    row('shm', 1 << 20, 1, 38),
    row('shm', 65536, 256, 12),
    row('tcp', 4096, 1, 0.01),
    row('tcp', 1 << 20, 1, 3.3),
    { ...row('tcp', 65536, 1, 0.3), op: 'READ' },
    { ...row('shm + notification', 65536, 1, 0.3) },
    { ...row('memcpy (one process)', 65536, 1, 40), op: 'copy' },
    {
      ...row('cuda-ipc GPU0->GPU1 Llama-3.1-8B block-major', 131072, 256, 330),
      section: 'kv',
      baseline: 'peer copy',
    },
  ];

  it('a panel per path with its baseline; KiB / MiB ticks; log GB/s; whole legend labels', async () => {
    const spec = transferChart(rows, 'Tandem bench:transfer', 'synthetic') as { concat: { title: { text: string } }[] };
    // WRITE rows only, notifications and copies (the baselines) not as panels of their own; KV rows as bars.
    expect(spec.concat.map((p) => p.title.text)).toEqual(['shm', 'tcp', 'KV of a 4,096-token prompt']);
    const svg = await renderSvg(spec);
    for (const text of [
      '4 KiB',
      '1 MiB',
      '16 MiB',
      '1 piece',
      '256 pieces',
      'one transfer scattered in',
      'dashed: memcpy, same bytes',
    ])
      expect(svg, text).toContain(text);
    expect(svg).toContain('Llama-3.1-8B block-major, 256 x 128 KiB');
    expect(svg).not.toContain('…'); // nothing truncated
    expect(svg).not.toMatch(/>\s*(65,?536|1,?048,?576)\s*</); // no raw byte counts on an axis
  });

  it('byte ticks are powers of two, at most eight', () => {
    expect(powerOfTwoTicks(4096, 1 << 20)).toEqual(
      [4096, 8192, 16384, 32768, 65536, 131072, 262144, 524288, 1 << 20].filter((_, i) => i % 2 === 0),
    );
    expect(powerOfTwoTicks(4096, 1 << 30).length).toBeLessThanOrEqual(8);
    expect(powerOfTwoTicks(65536, 65536)).toEqual([65536]);
  });
});

/**
 * The chart of bench:transfer, to the standard of lib/bench/chart.ts (log axes where values span decades, bytes
 * as KiB / MiB, whole legend labels, distinct colours, one panel per comparison); bench:engine draws its own in
 * bench/engine.ts.
 */
import {
  axisFor,
  BYTES_LABEL,
  colourScheme,
  PANEL_HEIGHT,
  PANEL_WIDTH,
  panels,
  powerOfTwoTicks,
  writeChart,
  type ChartSpec,
} from '../lib/bench/chart.js';

export { writeChart };

/** What the transfer chart reads of a bench:transfer row. */
export interface TransferChartRow {
  section: string;
  path: string;
  op: 'READ' | 'WRITE' | 'copy';
  memory: string;
  pieceBytes: number;
  pieces: number;
  bytes: number;
  gbps: number;
  baseline?: string;
  vsBaseline?: number;
}

/** The words (at most `most`) that every string starts with, leaving each at least one of its own. */
function commonWordPrefix(strings: string[], most: number): string {
  const words = strings.map((s) => s.split(' '));
  let n = 0;
  while (n < most && words.every((w) => n < w.length - 1 && w[n] === words[0]![n])) n++;
  return words[0]!.slice(0, n).join(' ');
}

const piecesLabel = (n: number) => (n === 1 ? '1 piece' : `${n.toLocaleString('en-US')} pieces`);

/**
 * bench:transfer: one panel per path (backend, GPU placement and memory kind), GB/s of WRITE against the bytes
 * of one transfer, a line per number of pieces it is scattered in, and the path's baseline (a plain copy of
 * the same total bytes, measured in the same run) dashed in black. KV-shaped transfers, one bar each against
 * their baseline, in a panel of their own.
 */
export function transferChart(rows: readonly TransferChartRow[], title: string, subtitle: string): ChartSpec {
  const sweep = rows.filter((r) => r.op === 'WRITE' && r.section !== 'kv' && !r.path.includes('notification'));
  const panelName = (r: TransferChartRow) =>
    r.memory === 'shared->shared' || r.memory === 'device->device' ? r.path : `${r.path} (${r.memory})`;
  const names = [...new Set(sweep.map(panelName))];
  const counts = [...new Set(sweep.map((r) => r.pieces))].sort((a, b) => a - b);
  const countLabels = counts.map(piecesLabel);
  const totals = sweep.map((r) => r.bytes);
  const byteTicks = powerOfTwoTicks(Math.min(...totals), Math.max(...totals));
  const specs: ChartSpec[] = names.map((name) => {
    const mine = sweep.filter((r) => panelName(r) === name);
    const baselineName = mine.find((r) => r.baseline)?.baseline;
    // The baseline at each total size this panel measured: the row's GB/s over its share of the baseline.
    const baseline = [
      ...new Map(mine.filter((r) => r.vsBaseline).map((r) => [r.bytes, r.gbps / r.vsBaseline!] as const)),
    ]
      .sort((a, b) => a[0] - b[0])
      .map(([bytes, gbps]) => ({ bytes, gbps }));
    const x = axisFor('bytes', 'bytes per transfer', totals, {
      base: 2,
      labelExpr: BYTES_LABEL,
      ticks: byteTicks,
      domain: [byteTicks[0]!, byteTicks.at(-1)!],
    });
    const y = axisFor('gbps', 'GB/s (p50 latency)', [...mine.map((r) => r.gbps), ...baseline.map((b) => b.gbps)]);
    return {
      width: PANEL_WIDTH * 0.75,
      height: PANEL_HEIGHT * 0.8,
      title: { text: name, subtitle: baselineName ? `dashed: ${baselineName}, same bytes` : 'no baseline' },
      layer: [
        ...(baseline.length
          ? [
              {
                data: { values: baseline },
                mark: { type: 'line', color: '#222', strokeDash: [6, 4], strokeWidth: 2, point: { color: '#222' } },
                encoding: { x, y },
              },
            ]
          : []),
        {
          data: { values: mine.map((r) => ({ bytes: r.bytes, gbps: r.gbps, pieces: piecesLabel(r.pieces) })) },
          mark: { type: 'line', point: true },
          encoding: {
            x,
            y,
            color: {
              field: 'pieces',
              type: 'nominal',
              title: 'one transfer scattered in',
              sort: countLabels,
              scale: { domain: countLabels, scheme: colourScheme(countLabels.length) },
            },
          },
        },
      ],
    };
  });
  const kv = rows.filter((r) => r.section === 'kv');
  if (kv.length) {
    // KV-shaped rows are one transfer each: a bar each, labelled inside the panel (axis labels that long would
    // widen its column of the grid).
    const prefix = commonWordPrefix(
      kv.map((r) => r.path),
      2,
    ); // the backend and the GPUs: 'cuda-ipc GPU0->GPU1'
    const bars = kv.map((r) => ({
      transfer:
        `${r.path.slice(prefix.length).trim()}, ${r.pieces.toLocaleString('en-US')} x ` +
        `${Math.round(r.pieceBytes / 1024)} KiB`,
      gbps: r.gbps,
      baseline: r.vsBaseline ? r.gbps / r.vsBaseline : null,
    }));
    const y = { field: 'transfer', type: 'nominal', sort: null, axis: null };
    specs.push({
      width: PANEL_WIDTH * 0.75,
      height: 34 * bars.length,
      title: {
        text: 'KV of a 4,096-token prompt',
        subtitle: `${prefix} WRITE; black tick: ${kv[0]!.baseline ?? 'the baseline'}, same bytes`,
      },
      data: { values: bars },
      layer: [
        {
          mark: { type: 'bar', color: '#a6c8e8' },
          encoding: { y, x: { field: 'gbps', type: 'quantitative', title: 'GB/s (p50 latency)' } },
        },
        {
          mark: { type: 'tick', color: '#222', thickness: 3 },
          encoding: { y, x: { field: 'baseline', type: 'quantitative' } },
        },
        {
          mark: { type: 'text', align: 'left', dx: 4, color: '#111', fontSize: 11 },
          encoding: { y, x: { datum: 0 }, text: { field: 'transfer' } },
        },
      ],
    });
  }
  return panels({ text: title, subtitle }, specs, 3);
}

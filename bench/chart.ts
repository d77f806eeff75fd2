/** SVG chart of bench:transfer rows (GB/s against piece size, one line per series), drawn with Vega-Lite. */
import { writeFileSync } from 'node:fs';
import * as vega from 'vega';
import { compile } from 'vega-lite';

export interface ChartPoint {
  series: string;
  pieceBytes: number;
  gbps: number;
  baseline: boolean;
}

export async function writeChart(file: string, title: string, points: ChartPoint[]): Promise<void> {
  const spec = compile({
    $schema: 'https://vega.github.io/schema/vega-lite/v5.json',
    title,
    width: 720,
    height: 420,
    data: { values: points },
    mark: { type: 'line', point: true },
    encoding: {
      x: { field: 'pieceBytes', type: 'quantitative', scale: { type: 'log', base: 2 }, title: 'piece size (bytes)' },
      y: { field: 'gbps', type: 'quantitative', title: 'GB/s' },
      color: { field: 'series', type: 'nominal', title: 'backend / baseline' },
      strokeDash: { field: 'baseline', type: 'nominal', title: 'baseline' },
    },
  }).spec;
  const view = new vega.View(vega.parse(spec), { renderer: 'none' });
  writeFileSync(file, await view.toSVG());
  view.finalize();
}

/**
 * Charts of the benchmarks (bench:serve, bench:transfer, bench:engine), drawn with Vega-Lite into SVG. One
 * standard for all of them, so that a reader gets a chart at a glance:
 * - a logarithmic axis where the values span a decade or more (else linear), with ticks people read
 *   (`1 ms`, `64 KiB`, `2 GiB`, not 65536);
 * - units on every axis title (ms, req/s, GB/s, KiB);
 * - legend labels whole (no truncation), colours distinct (Tableau 10, or 20 past ten series);
 * - one panel per comparison (`panels`), rather than every line on one plot.
 *
 * vega and vega-lite are development dependencies (36 MB): from an installed package, without them,
 * writeChart throws ChartUnavailableError and the benchmarks write their tables and JSON only.
 */
import { mkdirSync, writeFileSync } from 'node:fs';
import { dirname } from 'node:path';
import { TandemError } from '../errors.js';

/** vega or vega-lite is not installed: charts are skipped. */
export class ChartUnavailableError extends TandemError {
  constructor(reason: string) {
    super(
      'TANDEM_CHART_UNAVAILABLE',
      `charts need the packages vega and vega-lite (npm install vega vega-lite): ${reason}`,
    );
  }
}

/** A Vega-Lite spec (kept loose: the specs are built by the functions below and by their callers). */
export type ChartSpec = Record<string, unknown>;

export const PANEL_WIDTH = 440;
export const PANEL_HEIGHT = 300;

/** Values span this ratio or more (max / min of the positive ones): a logarithmic axis. */
export const LOG_SCALE_SPAN = 10;

/** Whether `values` are positive and span LOG_SCALE_SPAN or more. */
export function spansDecades(values: readonly number[]): boolean {
  const finite = values.filter((v) => Number.isFinite(v));
  if (finite.length === 0 || finite.some((v) => v <= 0)) return false;
  return Math.max(...finite) / Math.min(...finite) >= LOG_SCALE_SPAN;
}

/** A scale for values: logarithmic when they span decades (spansDecades), else linear. */
export function scaleFor(values: readonly number[], options: { base?: number; zero?: boolean } = {}): ChartSpec {
  if (spansDecades(values)) return { type: 'log', base: options.base ?? 10 };
  return { type: 'linear', zero: options.zero ?? true, nice: true };
}

/** Ticks at 1, 2, 5 x 10^k from below `min` to above `max`, for a log axis that reads at a glance. */
export function logTicks(min: number, max: number): number[] {
  const ticks: number[] = [];
  for (let e = Math.floor(Math.log10(min)); e <= Math.ceil(Math.log10(max)); e++)
    for (const m of [1, 2, 5]) {
      const v = m * 10 ** e;
      if (v >= min / 2.5 && v <= max * 2.5) ticks.push(Number(v.toPrecision(6)));
    }
  return ticks;
}

/**
 * A quantitative axis for `values`: a log scale with 1-2-5 ticks where they span decades, else linear. `ticks`
 * overrides the tick values (e.g. the measured points of a sweep); `domain` fixes the scale's extent (the same
 * in every panel).
 */
export function axisFor(
  field: string,
  title: string,
  values: readonly number[],
  options: { base?: number; zero?: boolean; ticks?: number[]; labelExpr?: string; domain?: [number, number] } = {},
): ChartSpec {
  const finite = values.filter((v) => Number.isFinite(v));
  const log = spansDecades(finite);
  const ticks = options.ticks ?? (log ? logTicks(Math.min(...finite), Math.max(...finite)) : undefined);
  const domain = options.domain ? { domain: options.domain } : {};
  return {
    field,
    type: 'quantitative',
    title,
    scale: log
      ? { type: 'log', base: options.base ?? 10, ...domain }
      : { type: 'linear', zero: options.zero ?? true, nice: true, ...domain },
    axis: {
      ...(ticks ? { values: ticks } : {}),
      labelExpr: options.labelExpr ?? NUMBER_LABEL,
    },
  };
}

/** Colours for `n` series, all distinct. */
export function colourScheme(n: number): string {
  return n <= 10 ? 'tableau10' : 'tableau20';
}

/** A Vega expression that writes a byte count as people read it (512 B, 64 KiB, 16 MiB, 2 GiB). */
export const BYTES_LABEL =
  "datum.value >= 1073741824 ? format(datum.value / 1073741824, '~g') + ' GiB' : " +
  "datum.value >= 1048576 ? format(datum.value / 1048576, '~g') + ' MiB' : " +
  "datum.value >= 1024 ? format(datum.value / 1024, '~g') + ' KiB' : format(datum.value, '~g') + ' B'";

/** A Vega expression for plain numbers on a log axis: 1, 10, 100, 1k, 10k (no 1e+3). */
export const NUMBER_LABEL = "datum.value >= 1000 ? format(datum.value, '~s') : format(datum.value, '~g')";

/** Shared look: readable fonts, whole legend labels, light grid. */
export const CHART_CONFIG: ChartSpec = {
  font: 'DejaVu Sans, Helvetica, Arial, sans-serif',
  title: { fontSize: 16, anchor: 'start', offset: 12 },
  axis: { labelFontSize: 12, titleFontSize: 13, gridColor: '#e4e4e4', labelOverlap: true },
  header: { labelFontSize: 14, titleFontSize: 14, labelFontWeight: 'bold' },
  legend: {
    orient: 'bottom',
    direction: 'horizontal',
    labelFontSize: 12,
    titleFontSize: 13,
    labelLimit: 0,
    titleLimit: 0,
    symbolSize: 220,
    symbolStrokeWidth: 2.5,
    columnPadding: 18,
  },
  line: { strokeWidth: 2.2 },
  point: { size: 45, filled: true },
  view: { stroke: '#bbb' },
};

/**
 * Panels side by side (wrapping after `columns`), each a layer or unit spec of its own; colours and dashes
 * mean the same in every panel; axes are each panel's own unless `sharedY` (panels read against each other).
 */
export function panels(
  title: string | { text: string; subtitle?: string | string[] },
  specs: ChartSpec[],
  columns = 2,
  { sharedY = false }: { sharedY?: boolean } = {},
): ChartSpec {
  return {
    $schema: 'https://vega.github.io/schema/vega-lite/v5.json',
    title,
    config: CHART_CONFIG,
    concat: specs,
    columns,
    spacing: 36,
    resolve: {
      scale: { color: 'shared', strokeDash: 'shared', y: sharedY ? 'shared' : 'independent', x: 'independent' },
    },
  };
}

/** Powers of two from `min` to `max` (bytes, say), every 2^k-th so that there are at most `most`. */
export function powerOfTwoTicks(min: number, max: number, most = 8): number[] {
  const lo = Math.floor(Math.log2(min));
  const hi = Math.ceil(Math.log2(max));
  const step = Math.max(1, Math.ceil((hi - lo + 1) / most));
  const ticks: number[] = [];
  for (let e = lo; e <= hi; e += step) ticks.push(2 ** e);
  return ticks;
}

/** Renders a Vega-Lite spec to SVG text. Throws ChartUnavailableError without vega and vega-lite. */
export async function renderSvg(spec: ChartSpec): Promise<string> {
  let vega: typeof import('vega');
  let vl: typeof import('vega-lite');
  try {
    [vega, vl] = await Promise.all([import('vega'), import('vega-lite')]);
  } catch (error) {
    throw new ChartUnavailableError((error as Error).message.split('\n')[0]!);
  }
  const compiled = vl.compile({ config: CHART_CONFIG, ...spec } as never).spec;
  const view = new vega.View(vega.parse(compiled), { renderer: 'none' });
  try {
    return await view.toSVG();
  } finally {
    view.finalize();
  }
}

/** Renders `spec` and writes it to `file` (its folder made if needed). */
export async function writeChart(file: string, spec: ChartSpec): Promise<void> {
  const svg = await renderSvg(spec);
  mkdirSync(dirname(file), { recursive: true });
  writeFileSync(file, svg);
}

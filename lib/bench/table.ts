/** Plain-text tables for the terminal, and the number formats the benchmarks print. */

export type Align = 'left' | 'right';

/** Columns padded to their widest cell, a rule under the header; the first column left-aligned by default. */
export function formatTable(header: string[], rows: string[][], align?: Align[]): string {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? '').length)));
  const side = (i: number): Align => align?.[i] ?? (i === 0 ? 'left' : 'right');
  const line = (cells: string[]) =>
    cells
      .map((c, i) => (side(i) === 'left' ? c.padEnd(widths[i]!) : c.padStart(widths[i]!)))
      .join('  ')
      .trimEnd();
  return [line(header), widths.map((w) => '-'.repeat(w)).join('  '), ...rows.map(line)].join('\n');
}

/** Three significant digits, no exponent for everyday magnitudes (0.0123, 1.23, 123, 12300). */
export function sig(x: number | null | undefined, digits = 3): string {
  if (x === null || x === undefined || !Number.isFinite(x)) return '-';
  if (x === 0) return '0';
  const abs = Math.abs(x);
  if (abs >= 10 ** digits) return Math.round(x).toString();
  const decimals = Math.max(0, digits - 1 - Math.floor(Math.log10(abs)));
  return x.toFixed(Math.min(decimals, 6));
}

/** A number as people write it: up to three significant digits, no trailing zeros (8, 0.5, 12.3, 1250). */
export function plain(x: number): string {
  return Math.abs(x) >= 1000 ? Math.round(x).toString() : Number(x.toPrecision(3)).toString();
}

/** A ratio as `1.23x`; '-' when either side is missing or the base is 0. */
export function ratio(value: number | null | undefined, base: number | null | undefined): string {
  if (value == null || base == null || !Number.isFinite(value) || !Number.isFinite(base) || base === 0) return '-';
  return `${plain(value / base)}x`;
}

/** A share in [0, 1] as a whole percentage. */
export function percent(x: number): string {
  return `${Math.round(x * 100)}%`;
}

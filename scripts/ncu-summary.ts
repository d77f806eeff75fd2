/**
 * tsx scripts/ncu-summary.ts FILE.csv [--json OUT.json] [--top N]
 *
 * Where one profiled forward's GPU time goes, from Nsight Compute's raw page as CSV
 * (`ncu --csv --page raw --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,
 * sm__throughput.avg.pct_of_peak_sustained_elapsed,gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed`,
 * or `ncu --import REPORT --csv --page raw`; scripts/profile-engine.sh writes both). That page has one header row
 * ("ID", "Process ID", ..., "Kernel Name", ..., then one column per metric), one row of units (empty for the launch
 * columns), then one row per profiled kernel launch; numbers may carry thousands separators ("10,240,000"). Lines
 * before the header (==PROF== messages, the application's own output) are skipped.
 *
 * Prints two markdown tables: per class of kernel (GEMM, GEMV, attention, norm, rope, elementwise, sampler, copy,
 * other; see kernelClass) and per kernel name (the top N by time, default 25), each with launches, total time,
 * share of the forward's kernel time, achieved DRAM GB/s ((read + write bytes) / time), and the time-weighted SM and
 * memory throughput (% of peak) and, where the CSV has METRICS.tensor, the tensor pipe's active share. Kernel time is the sum of the kernels' own durations as ncu measured them one at a
 * time (serialised, caches flushed between replays by default), not the forward's wall time.
 */
import { readFileSync, writeFileSync } from 'node:fs';
import { pathToFileURL } from 'node:url';
import { parseArgs } from 'node:util';
import { BadArgumentError } from '../lib/errors.js';

export const METRICS = {
  time: 'gpu__time_duration.sum',
  dramRead: 'dram__bytes_read.sum',
  dramWrite: 'dram__bytes_write.sum',
  sm: 'sm__throughput.avg.pct_of_peak_sustained_elapsed',
  memory: 'gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed',
  /** Optional: how busy the tensor cores (HMMA pipe) were while the kernel ran; the compute bound of attention. */
  tensor: 'sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active',
} as const;

export const KERNEL_CLASSES = [
  'GEMM',
  'GEMV',
  'attention',
  'norm',
  'rope',
  'elementwise',
  'sampler',
  'copy',
  'other',
] as const;
export type KernelClass = (typeof KERNEL_CLASSES)[number];

/** One profiled launch, in base units. */
export interface KernelLaunch {
  id: number;
  name: string;
  /** Seconds. */
  time: number;
  dramReadBytes: number;
  dramWriteBytes: number;
  /** % of peak; undefined where the column is absent. */
  smPct?: number;
  memoryPct?: number;
  tensorPct?: number;
}

/** What a line of kernels adds up to: a class, or one kernel name. */
export interface KernelGroup {
  key: string;
  launches: number;
  /** Seconds, summed over the launches. */
  time: number;
  /** time / the forward's kernel time. */
  share: number;
  dramReadBytes: number;
  dramWriteBytes: number;
  /** (read + write bytes) / time, in GB/s (1e9). */
  dramGBps: number;
  /** Time-weighted over the launches. */
  smPct?: number;
  memoryPct?: number;
  tensorPct?: number;
}

/** Records of RFC 4180 CSV: fields in double quotes may hold commas, newlines and doubled quotes. */
export function parseCsv(text: string): string[][] {
  const records: string[][] = [];
  let field = '';
  let record: string[] = [];
  let quoted = false;
  let i = 0;
  const endRecord = () => {
    record.push(field);
    field = '';
    if (record.length > 1 || record[0] !== '') records.push(record);
    record = [];
  };
  while (i < text.length) {
    const c = text[i]!;
    if (quoted) {
      if (c === '"' && text[i + 1] === '"') {
        field += '"';
        i += 2;
        continue;
      }
      if (c === '"') quoted = false;
      else field += c;
      i++;
      continue;
    }
    if (c === '"') quoted = true;
    else if (c === ',') {
      record.push(field);
      field = '';
    } else if (c === '\n') endRecord();
    else if (c !== '\r') field += c;
    i++;
  }
  if (field !== '' || record.length > 0) endRecord();
  return records;
}

const SCALE: Record<string, number> = {
  '': 1,
  '%': 1,
  second: 1,
  msecond: 1e-3,
  usecond: 1e-6,
  nsecond: 1e-9,
  // `--print-units base` on the H100 host's ncu (2025.3) writes these abbreviations.
  s: 1,
  ms: 1e-3,
  us: 1e-6,
  ns: 1e-9,
  B: 1,
  kB: 1e3,
  byte: 1,
  Kbyte: 1e3,
  Mbyte: 1e6,
  Gbyte: 1e9,
  Tbyte: 1e12,
  KB: 1e3,
  MB: 1e6,
  GB: 1e9,
  KiB: 2 ** 10,
  MiB: 2 ** 20,
  GiB: 2 ** 30,
};

/** A number of the raw page ("10,240,000", "4.0e-05", "n/a" is undefined) in base units. */
function value(text: string | undefined, unit: string, column: string): number | undefined {
  if (text === undefined || text === '' || text === 'n/a') return undefined;
  const n = Number(text.replace(/,/g, ''));
  const scale = SCALE[unit];
  if (!Number.isFinite(n)) throw new BadArgumentError(`${column}: '${text}' is not a number`);
  if (scale === undefined) throw new BadArgumentError(`${column}: unknown unit '${unit}'`);
  return n * scale;
}

/** The launches of an `ncu --csv --page raw` output. */
export function parseNcuRaw(text: string): KernelLaunch[] {
  const records = parseCsv(text);
  const headerAt = records.findIndex((r) => r[0] === 'ID' && r.includes('Kernel Name'));
  if (headerAt < 0)
    throw new BadArgumentError(
      'no ncu raw-page header ("ID", ..., "Kernel Name", ...): run ncu with --csv --page raw (or no kernel was profiled)',
    );
  const header = records[headerAt]!;
  const column = (name: string) => header.indexOf(name);
  const nameAt = column('Kernel Name');
  const timeAt = column(METRICS.time);
  if (timeAt < 0) throw new BadArgumentError(`the CSV has no ${METRICS.time} column: add it to --metrics`);
  let rows = records.slice(headerAt + 1);
  // The units row: no launch ID.
  let units: string[] = header.map(() => '');
  if (rows[0] && rows[0][0] === '') {
    units = rows[0];
    rows = rows.slice(1);
  }
  const metric = (row: string[], name: string) => {
    const at = column(name);
    return at < 0 ? undefined : value(row[at], units[at] ?? '', name);
  };
  return rows
    .filter((r) => r.length === header.length && /^\d+$/.test(r[0]!))
    .map((r) => {
      const launch: KernelLaunch = {
        id: Number(r[0]),
        name: r[nameAt]!,
        time: metric(r, METRICS.time) ?? 0,
        dramReadBytes: metric(r, METRICS.dramRead) ?? 0,
        dramWriteBytes: metric(r, METRICS.dramWrite) ?? 0,
      };
      const sm = metric(r, METRICS.sm);
      const memory = metric(r, METRICS.memory);
      const tensor = metric(r, METRICS.tensor);
      if (sm !== undefined) launch.smPct = sm;
      if (memory !== undefined) launch.memoryPct = memory;
      if (tensor !== undefined) launch.tensorPct = tensor;
      return launch;
    });
}

/**
 * The class of a kernel by its name, first match wins: Tandem's own kernels (native/kernels: tandem_gemv_*,
 * tandem_flash_*, tandem_llama_add_rmsnorm, tandem_llama_rope_kv, tandem_sample_*, ...) and cuBLAS / cuBLASLt's
 * (nvjet_*, cutlass, *gemm*, sm90_xmma_*, splitKreduce_kernel).
 */
export function kernelClass(name: string): KernelClass {
  const n = name.toLowerCase();
  if (/sampl|argmax|top_?k|top_?p/.test(n)) return 'sampler';
  if (/flash|attention|attn|fmha|sdpa/.test(n)) return 'attention';
  if (/gemv/.test(n)) return 'GEMV';
  if (/gemm|nvjet|cutlass|xmma|cublas|splitk|matmul/.test(n)) return 'GEMM';
  if (/norm/.test(n)) return 'norm';
  if (/rope|rotary/.test(n)) return 'rope';
  if (/copy|memcpy|gather|scatter|transpose/.test(n)) return 'copy';
  if (/silu|gelu|swiglu|add|mul|bias|embed|axpy|fill|scale|elementwise|sum_f32/.test(n)) return 'elementwise';
  return 'other';
}

/** Launches grouped by `keyOf`, largest total time first. */
export function group(launches: KernelLaunch[], keyOf: (l: KernelLaunch) => string): KernelGroup[] {
  const total = launches.reduce((a, l) => a + l.time, 0);
  const groups = new Map<string, KernelLaunch[]>();
  for (const l of launches) {
    const key = keyOf(l);
    groups.set(key, [...(groups.get(key) ?? []), l]);
  }
  const weighted = (ls: KernelLaunch[], pick: (l: KernelLaunch) => number | undefined) => {
    const known = ls.filter((l) => pick(l) !== undefined);
    const time = known.reduce((a, l) => a + l.time, 0);
    return known.length === 0 || time === 0 ? undefined : known.reduce((a, l) => a + pick(l)! * l.time, 0) / time;
  };
  return [...groups.entries()]
    .map(([key, ls]) => {
      const time = ls.reduce((a, l) => a + l.time, 0);
      const dramReadBytes = ls.reduce((a, l) => a + l.dramReadBytes, 0);
      const dramWriteBytes = ls.reduce((a, l) => a + l.dramWriteBytes, 0);
      const g: KernelGroup = {
        key,
        launches: ls.length,
        time,
        share: total === 0 ? 0 : time / total,
        dramReadBytes,
        dramWriteBytes,
        dramGBps: time === 0 ? 0 : (dramReadBytes + dramWriteBytes) / time / 1e9,
      };
      const sm = weighted(ls, (l) => l.smPct);
      const memory = weighted(ls, (l) => l.memoryPct);
      const tensor = weighted(ls, (l) => l.tensorPct);
      if (sm !== undefined) g.smPct = sm;
      if (memory !== undefined) g.memoryPct = memory;
      if (tensor !== undefined) g.tensorPct = tensor;
      return g;
    })
    .sort((a, b) => b.time - a.time || a.key.localeCompare(b.key));
}

export interface NcuSummary {
  launches: number;
  /** Seconds: the kernels' durations summed. */
  kernelTime: number;
  dramBytes: number;
  classes: KernelGroup[];
  kernels: KernelGroup[];
}

export function summarise(launches: KernelLaunch[]): NcuSummary {
  return {
    launches: launches.length,
    kernelTime: launches.reduce((a, l) => a + l.time, 0),
    dramBytes: launches.reduce((a, l) => a + l.dramReadBytes + l.dramWriteBytes, 0),
    classes: group(launches, (l) => kernelClass(l.name)),
    kernels: group(launches, (l) => l.name),
  };
}

const fixed = (x: number | undefined, digits: number) => (x === undefined ? '' : x.toFixed(digits));

function table(title: string, groups: KernelGroup[]): string {
  const head = `| ${title} | launches | total ms | share | avg us | DRAM read MB | DRAM write MB | DRAM GB/s | SM % | memory % | tensor % |`;
  const rule = `|${' --- |'.repeat(11)}`;
  const lines = groups.map(
    (g) =>
      `| ${g.key.replace(/\|/g, '\\|')} | ${g.launches} | ${fixed(g.time * 1e3, 3)} | ${fixed(g.share * 100, 1)}% | ` +
      `${fixed((g.time / g.launches) * 1e6, 1)} | ${fixed(g.dramReadBytes / 1e6, 1)} | ${fixed(g.dramWriteBytes / 1e6, 1)} | ` +
      `${fixed(g.dramGBps, 0)} | ${fixed(g.smPct, 1)} | ${fixed(g.memoryPct, 1)} | ${fixed(g.tensorPct, 1)} |`,
  );
  return [head, rule, ...lines].join('\n');
}

/** The markdown the script prints: a totals line, the classes, and the top `top` kernels by time. */
export function formatSummary(s: NcuSummary, top = 25): string {
  const shown = s.kernels.slice(0, top);
  return [
    `${s.launches} kernel launches, ${(s.kernelTime * 1e3).toFixed(3)} ms of kernel time, ` +
      `${(s.dramBytes / 1e9).toFixed(3)} GB DRAM traffic (${(s.kernelTime === 0 ? 0 : s.dramBytes / s.kernelTime / 1e9).toFixed(0)} GB/s over the kernel time)`,
    '',
    table('class', s.classes),
    '',
    table(shown.length < s.kernels.length ? `kernel (top ${shown.length} of ${s.kernels.length})` : 'kernel', shown),
  ].join('\n');
}

async function main() {
  const { values, positionals } = parseArgs({
    allowPositionals: true,
    options: { json: { type: 'string' }, top: { type: 'string' } },
  });
  if (positionals.length !== 1) {
    console.error('usage: tsx scripts/ncu-summary.ts FILE.csv [--json OUT.json] [--top N]');
    process.exitCode = 2;
    return;
  }
  const top = values.top === undefined ? 25 : Number(values.top);
  try {
    if (!Number.isSafeInteger(top) || top < 1)
      throw new BadArgumentError(`--top must be a positive integer (got ${values.top})`);
    const summary = summarise(parseNcuRaw(readFileSync(positionals[0]!, 'utf8')));
    console.log(formatSummary(summary, top));
    if (values.json) writeFileSync(values.json, JSON.stringify(summary, null, 2) + '\n');
  } catch (error) {
    if (!(error instanceof BadArgumentError)) throw error;
    console.error(`ncu-summary: ${positionals[0]}: ${error.message}`);
    process.exitCode = 2;
  }
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) await main();

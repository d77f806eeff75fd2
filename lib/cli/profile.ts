/**
 * `tandem profile --model <dir|dummy:preset> --out FILE [--quick] [--isl N,...] [--batch N,...] [--context N,...]
 *  [--tp N,...] [--pp N,...] [--ep N,...] [--device cpu|cuda|auto] [--threads N] [--seed S]`
 *
 * Measures a performance profile through the engine (lib/planner/profiler.ts), one entry per parallel layout of
 * the sizes listed (every combination of --tp, --pp and --ep; default 1 each; those the model does not allow are
 * left out, and said so on stderr), progress on stderr; writes the profile to FILE, prints its tables and draws
 * its chart beside it (FILE without .json, plus .svg).
 */
import { ChartUnavailableError, writeChart } from '../bench/chart.js';
import { layoutGrid, measureProfile, writeProfile, type ProfileSweep } from '../planner/index.js';
import { formatProfile, profileChart } from '../planner/report.js';
import { choiceOption, numberOption, UsageError } from './args.js';

export interface ProfileArgs {
  model?: string;
  out?: string;
  quick?: boolean;
  isl?: string;
  batch?: string;
  context?: string;
  tp?: string;
  pp?: string;
  ep?: string;
  device?: string;
  threads?: string;
  seed?: string;
}

/** `--isl 128,256`: positive integers, each checked as numberOption checks one (UsageError naming the option). */
export function integerListOption(name: string, value: string | undefined): number[] | undefined {
  if (value === undefined) return undefined;
  return value.split(',').map((part) => numberOption(name, part.trim(), { integer: true, min: 1 })!);
}

/** The chart's path: FILE.json -> FILE.svg, anything else gets .svg appended. */
export function chartPathFor(out: string): string {
  return out.endsWith('.json') ? `${out.slice(0, -'.json'.length)}.svg` : `${out}.svg`;
}

export async function profile(args: ProfileArgs): Promise<number> {
  if (!args.model) throw new UsageError('--model is required (a checkpoint directory or dummy:<preset>)');
  if (!args.out) throw new UsageError('--out is required (the profile JSON file to write)');
  const sweep: Partial<ProfileSweep> = {};
  const isl = integerListOption('isl', args.isl);
  const batch = integerListOption('batch', args.batch);
  const context = integerListOption('context', args.context);
  if (isl) sweep.isl = isl;
  if (batch) sweep.batch = batch;
  if (context) sweep.context = context;
  const layouts = layoutGrid({
    tp: integerListOption('tp', args.tp) ?? [1],
    pp: integerListOption('pp', args.pp) ?? [1],
    ep: integerListOption('ep', args.ep) ?? [1],
  });
  const device = choiceOption('device', args.device, ['cpu', 'cuda', 'auto'] as const) ?? 'auto';
  const threads = numberOption('threads', args.threads, { integer: true, min: 1 });
  const seed = numberOption('seed', args.seed, { integer: true });

  const started = performance.now();
  const tty = process.stderr.isTTY;
  const measured = await measureProfile({
    model: args.model,
    device,
    sweep,
    quick: args.quick ?? false,
    layouts,
    ...(threads !== undefined ? { threads } : {}),
    ...(seed !== undefined ? { seed } : {}),
    onProgress: ({ done, total, point }) => {
      const elapsed = ((performance.now() - started) / 1000).toFixed(0);
      const line = `profile ${args.model}: ${done}/${total} ${point} (${elapsed} s)`;
      // A terminal gets one line rewritten in place; a log gets one line per point.
      if (tty) process.stderr.write(`\r\x1b[K${line}${done === total ? '\n' : ''}`);
      else process.stderr.write(`${line}\n`);
    },
    onSkip: (point, why) => process.stderr.write(`${tty ? '\r\x1b[K' : ''}profile: ${point} left out: ${why}\n`),
    onSkipLayout: (layout, why) =>
      process.stderr.write(`${tty ? '\r\x1b[K' : ''}profile: layout ${layout} left out: ${why}\n`),
  });
  writeProfile(args.out, measured);
  console.log(formatProfile(measured));
  console.log('');
  console.log(`profile written to ${args.out}`);
  const chart = chartPathFor(args.out);
  try {
    await writeChart(chart, profileChart(measured));
    console.log(`chart written to ${chart}`);
  } catch (error) {
    if (!(error instanceof ChartUnavailableError)) throw error;
    process.stderr.write(`tandem: no chart: ${error.message}\n`);
  }
  return 0;
}

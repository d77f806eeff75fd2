/**
 * npm run bench:engine-ab -- --variants "A=1;B=2,C=3" [--rounds 2] [--json FILE] [--svg FILE] -- [bench:engine options]
 *
 * Same-machine A/B runs of the engine's switches (TANDEM_ELEMENTWISE, TANDEM_DECODE_GRID, ...), in one command.
 * The baseline (the environment as it is) and each variant (`;` between variants, `,` between a variant's
 * NAME=VALUE settings) run `bench/engine.ts --torch off` with the options after `--`, one process each, in rounds:
 * every round runs every variant once, each round starting one variant later than the one before, so that a GPU
 * warming through the run does not always favour the same one. A row's time per variant is the median over the
 * rounds of bench:engine's p50; "x" is the baseline's time over the variant's (above 1: the variant is faster), and
 * "spread" is the baseline's (max - min) / median over the rounds: a gain smaller than it is noise.
 *
 * Prints the table; writes the JSON (default bench-results/engine-ab.json: every run's rows and recorded switches)
 * and an SVG chart of each variant's speed-up per row beside it (--svg to place it elsewhere). A run that fails
 * stops the benchmark with its output's end and exit code 1, after writing what the finished runs measured.
 * Bad options: exit code 2 and the reason.
 */
import { spawnSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { axisFor, PANEL_HEIGHT, PANEL_WIDTH, panels, writeChart } from '../lib/bench/chart.js';
import { median } from '../lib/bench/stats.js';
import { numberOption, UsageError } from '../lib/cli/args.js';
import { formatTable } from '../lib/bench/table.js';

const ENGINE = join(dirname(fileURLToPath(import.meta.url)), 'engine.ts');
const NAME = /^[A-Z_][A-Z0-9_]*$/;

class AbUsageError extends Error {}

const USAGE = `usage: npm run bench:engine-ab -- --variants "NAME=VALUE[,NAME=VALUE...][;...]" [--rounds N] [--json FILE]
         [--svg FILE] -- [bench:engine options, without --json, --svg, --torch, --profile-case]
  Runs bench:engine (--torch off) for the baseline (this environment) and each variant, --rounds times (default 2,
  1 to 20) in rotating order, and prints each row's median time per variant and its speed-up over the baseline.
  JSON: --json (default bench-results/engine-ab.json); SVG beside it unless --svg.
  On a GPU host without Node, through the bundle: ./run bench:engine-ab --variants ... -- --model dummy:llama-3.1-8b`;

/** One variant: its label and the environment it sets (the baseline: none). */
interface Variant {
  label: string;
  env: Record<string, string>;
}

/** `--variants` text as variants after the baseline; throws AbUsageError on a malformed or repeated setting. */
function parseVariants(text: string): Variant[] {
  const variants: Variant[] = [{ label: 'baseline', env: {} }];
  for (const part of text.split(';').map((p) => p.trim())) {
    if (!part) throw new AbUsageError(`--variants: an empty variant in ${JSON.stringify(text)}`);
    const env: Record<string, string> = {};
    for (const setting of part.split(',').map((s) => s.trim())) {
      const eq = setting.indexOf('=');
      const name = eq < 0 ? setting : setting.slice(0, eq);
      if (eq < 0 || !NAME.test(name))
        throw new AbUsageError(
          `--variants: expected NAME=VALUE (NAME in capitals, digits and _), got ${JSON.stringify(setting)}`,
        );
      const value = setting.slice(eq + 1);
      if (/[\0-\x1f]/.test(value)) throw new AbUsageError(`--variants: a control character in the value of ${name}`);
      if (name in env) throw new AbUsageError(`--variants: ${name} is set twice in ${JSON.stringify(part)}`);
      env[name] = value;
    }
    const label = Object.entries(env)
      .map(([k, v]) => `${k}=${v}`)
      .join(' ');
    if (variants.some((v) => v.label === label)) throw new AbUsageError(`--variants: ${label} is listed twice`);
    variants.push({ label, env });
  }
  return variants;
}

/** The order of round `round` (0-based): every variant once, starting `round` places later. */
function roundOrder(variants: number, round: number): number[] {
  return Array.from({ length: variants }, (_, i) => (i + round) % variants);
}

interface EngineRow {
  phase: 'prefill' | 'decode';
  batch: number;
  tokens: number;
  context: number;
  msP50: number;
}

const rowKey = (r: EngineRow) => `${r.phase} b${r.batch} ctx${r.context} t${r.tokens}`;
const sig = (x: number) => (x >= 100 ? x.toFixed(1) : x >= 10 ? x.toFixed(2) : x.toFixed(3));

/** Per row (in the baseline's order): each variant's median over the rounds, its speed-up, the baseline's spread. */
function summarise(variants: Variant[], runs: { variant: number; rows: EngineRow[] }[]) {
  const first = runs.find((r) => r.variant === 0)?.rows ?? runs[0]?.rows ?? [];
  return first.map((row) => {
    const key = rowKey(row);
    const ms = variants.map((_, v) =>
      runs.filter((r) => r.variant === v).flatMap((r) => r.rows.filter((x) => rowKey(x) === key).map((x) => x.msP50)),
    );
    const med = ms.map((xs) => (xs.length ? median(xs) : NaN));
    const base = ms[0]!;
    return {
      phase: row.phase,
      batch: row.batch,
      tokens: row.tokens,
      context: row.context,
      ms,
      median: med,
      vsBaseline: med.map((m) => med[0]! / m),
      spread: base.length > 1 ? (Math.max(...base) - Math.min(...base)) / med[0]! : 0,
    };
  });
}

async function main(argv: string[]): Promise<number> {
  const split = argv.indexOf('--');
  const own = split < 0 ? argv : argv.slice(0, split);
  const passed = split < 0 ? [] : argv.slice(split + 1);
  const { values } = parseArgs({
    args: own,
    options: {
      variants: { type: 'string' },
      rounds: { type: 'string', default: '2' },
      json: { type: 'string', default: 'bench-results/engine-ab.json' },
      svg: { type: 'string' },
      help: { type: 'boolean' },
    },
    strict: true,
  });
  if (values.help) {
    console.log(USAGE);
    return 0;
  }
  if (!values.variants) throw new AbUsageError('--variants is required, e.g. --variants "TANDEM_ELEMENTWISE=1"');
  const variants = parseVariants(values.variants);
  const rounds = numberOption('rounds', values.rounds, { integer: true, min: 1, max: 20 })!;
  for (const flag of ['--json', '--svg', '--torch', '--profile-case'])
    if (passed.some((a) => a === flag || a.startsWith(`${flag}=`)))
      throw new AbUsageError(`${flag} is bench:engine-ab's to set: leave it out of the options after --`);

  const dir = mkdtempSync(join(tmpdir(), 'tandem-engine-ab-'));
  const runs: { round: number; variant: number; environment: Record<string, string>; rows: EngineRow[] }[] = [];
  const total = rounds * variants.length;
  let failure: string | undefined;
  try {
    outer: for (let round = 0; round < rounds; round++)
      for (const v of roundOrder(variants.length, round)) {
        const variant = variants[v]!;
        const file = join(dir, `r${round}-v${v}.json`);
        console.error(`bench:engine-ab: run ${runs.length + 1} of ${total}: round ${round + 1}, ${variant.label}`);
        const r = spawnSync(
          process.execPath,
          ['--import', 'tsx', ENGINE, ...passed, '--torch', 'off', '--json', file, '--svg', join(dir, 'x.svg')],
          {
            env: { ...process.env, ...variant.env },
            encoding: 'utf8',
            maxBuffer: 64 * 2 ** 20,
          },
        );
        if (r.status !== 0) {
          failure =
            `${variant.label} (round ${round + 1}) exited with ${r.status ?? r.signal}:\n` +
            (r.stderr || r.stdout).trim().split('\n').slice(-15).join('\n');
          break outer;
        }
        const out = JSON.parse(readFileSync(file, 'utf8')) as {
          rows: EngineRow[];
          environment?: Record<string, string>;
        };
        runs.push({ round, variant: v, environment: out.environment ?? {}, rows: out.rows });
      }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }

  const rows = summarise(variants, runs);
  const header = [
    'phase',
    'batch',
    'tokens',
    'context',
    ...variants.flatMap((v, i) => (i ? [`${v.label} ms`, 'x'] : [`${v.label} ms`, 'spread'])),
  ];
  console.log(
    `bench:engine-ab: ${runs.length} of ${total} runs, ${rounds} round(s); ms = median over the rounds of bench:engine's p50; ` +
      `x = baseline ms / variant ms; spread = the baseline's (max - min) / median`,
  );
  console.log(
    formatTable(
      header,
      rows.map((r) => [
        r.phase,
        String(r.batch),
        String(r.tokens),
        String(r.context),
        ...r.median.flatMap((m, i) =>
          i
            ? [Number.isNaN(m) ? '-' : sig(m), Number.isNaN(m) ? '-' : `${r.vsBaseline[i]!.toFixed(3)}x`]
            : [sig(m), `${(r.spread * 100).toFixed(1)}%`],
        ),
      ]),
    ),
  );
  mkdirSync(dirname(values.json), { recursive: true });
  writeFileSync(
    values.json,
    JSON.stringify({ variants, rounds, passed, complete: failure === undefined, runs, rows }, null, 2) + '\n',
  );
  console.log(`wrote ${values.json}`);
  const svg = values.svg ?? values.json.replace(/\.json$/, '') + '.svg';
  const points = rows
    .flatMap((r) =>
      variants.slice(1).map((v, i) => ({
        row: `${r.phase} b${r.batch} ctx${r.context} t${r.tokens}`,
        variant: v.label,
        x: r.vsBaseline[i + 1]!,
      })),
    )
    .filter((p) => Number.isFinite(p.x));
  if (points.length) {
    await writeChart(
      svg,
      panels(
        {
          text: 'Tandem bench:engine-ab: each variant against the baseline, same machine',
          subtitle: `${rounds} round(s); above 1: the variant is faster`,
        },
        [
          {
            width: PANEL_WIDTH * 1.5,
            height: PANEL_HEIGHT,
            data: { values: points },
            layer: [
              {
                mark: { type: 'rule', color: '#888', strokeDash: [4, 4] },
                encoding: { x: { datum: 1, type: 'quantitative' } },
              },
              {
                mark: { type: 'point', filled: true, size: 90 },
                encoding: {
                  y: {
                    field: 'row',
                    type: 'nominal',
                    title: 'row (phase, batch, context, tokens)',
                    sort: null,
                    axis: { labelLimit: 400 },
                  },
                  x: axisFor(
                    'x',
                    'baseline ms / variant ms (above 1: the variant is faster)',
                    [...points.map((p) => p.x), 1],
                    {
                      zero: false,
                    },
                  ),
                  color: { field: 'variant', type: 'nominal', title: 'variant' },
                  shape: { field: 'variant', type: 'nominal', title: 'variant' },
                },
              },
            ],
          },
        ],
        1,
      ),
    );
    console.log(`wrote ${svg}`);
  }
  if (failure) {
    console.error(`bench:engine-ab: ${failure}`);
    return 1;
  }
  return 0;
}

try {
  process.exitCode = await main(process.argv.slice(2));
} catch (error) {
  if (
    error instanceof AbUsageError ||
    error instanceof UsageError ||
    (error instanceof TypeError && String((error as { code?: unknown }).code).startsWith('ERR_PARSE_ARGS'))
  ) {
    console.error(`bench:engine-ab: ${error.message}`);
    process.exitCode = 2;
  } else throw error;
}

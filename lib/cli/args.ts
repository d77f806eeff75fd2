/**
 * The command line's arguments: which options each command takes, and every way they can be wrong, as one
 * line (`tandem: unknown option --bogus (see tandem --help)`) and exit status 2 (UsageError).
 *
 * node:util parseArgs splits the line (non-strict, so that its raw messages never reach the user); the checks
 * here are the strict ones, worded for people. A string option's value may start with '-' when it is a
 * number (`--max-tokens -5` is the value -5, which the command then refuses as out of range).
 */
import { parseArgs } from 'node:util';
import { TandemError } from '../errors.js';

/** The command line is wrong: the message says how, in one line. Exit status 2. */
export class UsageError extends TandemError {
  constructor(message: string) {
    super('TANDEM_USAGE', message);
  }
}

interface OptionSpec {
  type: 'string' | 'boolean';
  short?: string;
}

const OPTIONS = {
  help: { type: 'boolean', short: 'h' },
  version: { type: 'boolean', short: 'v' },
  json: { type: 'boolean' },
  model: { type: 'string' },
  prompt: { type: 'string' },
  'max-tokens': { type: 'string' },
  device: { type: 'string' },
  seed: { type: 'string' },
  temperature: { type: 'string' },
  'top-p': { type: 'string' },
  'top-k': { type: 'string' },
  threads: { type: 'string' },
  tp: { type: 'string' },
  pp: { type: 'string' },
  ep: { type: 'string' },
  eplb: { type: 'boolean' },
  'eplb-window': { type: 'string' },
  'eplb-period': { type: 'string' },
  'eplb-redundant': { type: 'string' },
  'eplb-min-gain': { type: 'string' },
  chat: { type: 'boolean' },
  file: { type: 'string', short: 'f' },
  mode: { type: 'string' },
  host: { type: 'string' },
  port: { type: 'string' },
  'api-key': { type: 'string' },
  out: { type: 'string' },
  quick: { type: 'boolean' },
  isl: { type: 'string' },
  osl: { type: 'string' },
  batch: { type: 'string' },
  context: { type: 'string' },
  profile: { type: 'string' },
  rate: { type: 'string' },
  'ttft-ms': { type: 'string' },
  'itl-ms': { type: 'string' },
  gpus: { type: 'string' },
  'router-policy': { type: 'string' },
  'migration-limit': { type: 'string' },
  join: { type: 'string' },
  control: { type: 'string' },
  pool: { type: 'string' },
  graph: { type: 'string' },
  name: { type: 'string' },
  namespace: { type: 'string' },
  'kv-backend': { type: 'string' },
  advertise: { type: 'string' },
  'kv-port': { type: 'string' },
  'status-port': { type: 'string' },
  'drain-timeout': { type: 'string' },
} as const satisfies Record<string, OptionSpec>;

export type OptionName = keyof typeof OPTIONS;
export type OptionValues = { [K in OptionName]?: (typeof OPTIONS)[K]['type'] extends 'boolean' ? boolean : string };

export const COMMANDS = ['info', 'start', 'serve', 'generate', 'profile', 'plan', 'worker', 'frontend'] as const;
export type Command = (typeof COMMANDS)[number];

const GLOBAL: readonly OptionName[] = ['help', 'version'];
const SERVING: readonly OptionName[] = ['mode', 'host', 'port', 'seed', 'api-key', 'router-policy', 'migration-limit'];
/** The options each command takes (besides --help and --version). */
export const COMMAND_OPTIONS: Record<Command, readonly OptionName[]> = {
  info: ['json'],
  start: ['model', ...SERVING],
  serve: ['file', 'control', 'namespace', ...SERVING],
  worker: [
    'join',
    'pool',
    'graph',
    'host',
    'advertise',
    'port',
    'kv-port',
    'status-port',
    'name',
    'namespace',
    'seed',
    'kv-backend',
    'drain-timeout',
  ],
  frontend: ['join', 'graph', 'host', 'port', 'namespace', 'api-key', 'migration-limit', 'router-policy'],
  generate: [
    'model',
    'prompt',
    'max-tokens',
    'device',
    'seed',
    'temperature',
    'top-p',
    'top-k',
    'threads',
    'tp',
    'pp',
    'ep',
    'eplb',
    'eplb-window',
    'eplb-period',
    'eplb-redundant',
    'eplb-min-gain',
    'chat',
    'json',
  ],
  profile: ['model', 'out', 'quick', 'isl', 'batch', 'context', 'tp', 'pp', 'ep', 'device', 'threads', 'seed'],
  plan: ['profile', 'isl', 'osl', 'rate', 'ttft-ms', 'itl-ms', 'gpus', 'json'],
};

export interface CommandLine {
  /** Absent for `tandem`, `tandem --help`, `tandem --version`. */
  command?: Command;
  values: OptionValues;
}

const SEE_HELP = '(see tandem --help)';
const NUMBER = /^-?(\d+\.?\d*|\.\d+)(e[-+]?\d+)?$/i;

/** Splits and checks `argv` (without node and the script). Throws UsageError. */
export function parseCommandLine(argv: string[]): CommandLine {
  const { tokens } = parseArgs({ args: argv, options: OPTIONS, strict: false, allowPositionals: true, tokens: true });
  let command: Command | undefined;
  const values: Record<string, string | boolean> = {};
  const given: { name: string; rawName: string }[] = [];
  for (const token of tokens) {
    if (token.kind === 'option-terminator') continue;
    if (token.kind === 'positional') {
      if (command === undefined && (COMMANDS as readonly string[]).includes(token.value)) {
        command = token.value as Command;
        continue;
      }
      throw new UsageError(
        command === undefined
          ? `unknown command '${token.value}' ${SEE_HELP}`
          : `unexpected argument '${token.value}' ${SEE_HELP}`,
      );
    }
    const spec = (OPTIONS as Record<string, OptionSpec>)[token.name];
    // A long option is written --name; a single dash before a long name (-model) is unknown too.
    if (!spec || (token.rawName.length > 2 && !token.rawName.startsWith('--')))
      throw new UsageError(`unknown option ${token.rawName} ${SEE_HELP}`);
    const name = `--${token.name}`;
    if (spec.type === 'boolean') {
      if (token.value !== undefined) throw new UsageError(`${name} takes no value (got '${token.value}')`);
      values[token.name] = true;
    } else {
      const value = token.value;
      // `--model --json`: the next option is not a value; `--max-tokens -5` is (a number, refused later by range).
      if (value === undefined || (!token.inlineValue && value.startsWith('-') && !NUMBER.test(value)))
        throw new UsageError(`${name} needs a value`);
      values[token.name] = value;
    }
    given.push(token);
  }
  if (command !== undefined && !values.help) {
    const allowed = new Set<string>([...GLOBAL, ...COMMAND_OPTIONS[command]]);
    for (const option of given)
      if (!allowed.has(option.name)) throw new UsageError(`unknown option --${option.name} for ${command} ${SEE_HELP}`);
  }
  return { ...(command !== undefined ? { command } : {}), values: values as OptionValues };
}

/** A number option's value: undefined when not given; UsageError naming the option when not in range. */
export function numberOption(
  name: string,
  value: string | undefined,
  { integer = false, min = 0, max = Infinity }: { integer?: boolean; min?: number; max?: number } = {},
): number | undefined {
  if (value === undefined) return undefined;
  const n = value.trim() === '' ? NaN : Number(value);
  if (Number.isFinite(n) && (!integer || Number.isInteger(n)) && n >= min && n <= max) return n;
  let what: string;
  if (integer && min === 1 && max === Infinity) what = 'a positive integer';
  else if (integer && max === Infinity) what = `an integer >= ${min}`;
  else if (integer) what = `an integer in ${min}..${max}`;
  else if (max === Infinity) what = `a number >= ${min}`;
  else what = `a number in ${min}..${max}`;
  throw new UsageError(`--${name} must be ${what} (got ${value})`);
}

/** A choice option's value: undefined when not given; UsageError listing the choices otherwise. */
export function choiceOption<const T extends string>(
  name: string,
  value: string | undefined,
  choices: readonly T[],
): T | undefined {
  if (value === undefined) return undefined;
  if ((choices as readonly string[]).includes(value)) return value as T;
  const what = choices.length === 2 ? choices.join(' or ') : `one of ${choices.join(', ')}`;
  throw new UsageError(`--${name} must be ${what} (got ${value})`);
}

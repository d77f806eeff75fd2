/**
 * `tandem generate --model <dir|dummy:preset> --prompt TEXT --max-tokens N [--device cpu|cuda] [--seed S]
 *  [--temperature T] [--top-p P] [--top-k K] [--threads N] [--tp N] [--pp N] [--ep N] [--eplb [--eplb-window N]
 *  [--eplb-period N] [--eplb-redundant N] [--eplb-min-gain G]] [--chat] [--json]`
 *
 * --tp / --pp / --ep run the model as tensor x pipeline parallel ranks, an MoE model's experts split over ep of
 * them (lib/engine/parallel.ts): on the CPU engine, one native thread per rank; on the GPU engine (--tp and --ep), one
 * model per rank, every rank on one GPU; the layout is printed on stderr (and is `layout` in --json). --eplb balances
 * the experts over the ep ranks online (either engine; lib/moe's EplbPolicy, its defaults unless an --eplb-* option sets
 * windowSteps, periodSteps, redundantSlotsPerRank or minImbalanceGain; any --eplb-* option implies --eplb); the
 * balancer's decisions are summed up on stderr (`eplb` in --json).
 *
 * Loads the model (progress on stderr), runs one request through the engine and prints the text as it is
 * generated, or with --json one object: token ids, text, finish reason and timings.
 */
import { openModel } from '../engine/open.js';
import { rankCount } from '../engine/parallel.js';
import { DEFAULT_EPLB_POLICY, type EplbPolicy, type ExpertBalancer } from '../moe/policy.js';
import { choiceOption, numberOption, UsageError } from './args.js';

export interface GenerateArgs {
  model?: string;
  prompt?: string;
  'max-tokens'?: string;
  device?: string;
  seed?: string;
  temperature?: string;
  'top-p'?: string;
  'top-k'?: string;
  threads?: string;
  tp?: string;
  pp?: string;
  ep?: string;
  eplb?: boolean;
  'eplb-window'?: string;
  'eplb-period'?: string;
  'eplb-redundant'?: string;
  'eplb-min-gain'?: string;
  chat?: boolean;
  json?: boolean;
}

export async function generate(args: GenerateArgs): Promise<number> {
  if (!args.model) throw new UsageError('--model is required (a checkpoint directory or dummy:<preset>)');
  if (args.prompt === undefined) throw new UsageError('--prompt is required');
  const maxTokens = numberOption('max-tokens', args['max-tokens'], { integer: true, min: 1 }) ?? 64;
  const temperature = numberOption('temperature', args.temperature) ?? 0;
  const seed = numberOption('seed', args.seed, { integer: true });
  const topP = numberOption('top-p', args['top-p'], { max: 1 });
  const topK = numberOption('top-k', args['top-k'], { integer: true });
  const threads = numberOption('threads', args.threads, { integer: true, min: 1 });
  const device = choiceOption('device', args.device, ['cpu', 'cuda', 'auto'] as const) ?? 'auto';
  const tensorParallelSize = numberOption('tp', args.tp, { integer: true, min: 1 }) ?? 1;
  const pipelineParallelSize = numberOption('pp', args.pp, { integer: true, min: 1 }) ?? 1;
  const expertParallelSize = numberOption('ep', args.ep, { integer: true, min: 1 }) ?? 1;
  const eplb = eplbOptions(args);
  if (eplb && expertParallelSize < 2)
    throw new UsageError('--eplb balances experts over expert-parallel ranks: it needs --ep 2 or more');

  const t0 = performance.now();
  let lastReport = 0;
  const opened = await openModel({
    model: args.model,
    device,
    ...(threads !== undefined ? { threads } : {}),
    tensorParallelSize,
    pipelineParallelSize,
    expertParallelSize,
    ...(eplb ? { eplb } : {}),
    onProgress: (loaded, total) => {
      const now = performance.now();
      if (loaded === total || now - lastReport > 250) {
        lastReport = now;
        process.stderr.write(`\rloading ${args.model}: ${loaded}/${total} tensors`);
        if (loaded === total) process.stderr.write('\n');
      }
    },
  });
  try {
    const loadMs = performance.now() - t0;
    if (!args.json && rankCount(opened.parallel) > 1)
      process.stderr.write(`${opened.device} engine, ${opened.layout}\n`);
    const tok = opened.tokenizer;
    const text = args.chat ? tok.applyChatTemplate([{ role: 'user', content: args.prompt }]) : args.prompt;
    const promptTokenIds = args.chat ? tok.encode(text, { addBos: false }) : tok.encode(text);
    const handle = opened.engine.addRequest({
      promptTokenIds,
      sampling: {
        temperature,
        maxTokens,
        stopTokenIds: tok.eosIds,
        ...(seed !== undefined ? { seed } : {}),
        ...(topP !== undefined ? { topP } : {}),
        ...(topK !== undefined ? { topK } : {}),
      },
    });
    const started = performance.now();
    let firstTokenMs: number | undefined;
    const decoder = tok.decoder();
    const tokenIds: number[] = [];
    let finishReason: string | null = null;
    for await (const out of handle) {
      if (out.tokenIds.length && firstTokenMs === undefined) firstTokenMs = performance.now() - started;
      tokenIds.push(...out.tokenIds);
      const piece = decoder.push(out.tokenIds.filter((id) => !tok.eosIds.includes(id)));
      if (!args.json && piece) process.stdout.write(piece);
      finishReason = out.finishReason ?? finishReason;
    }
    const tail = decoder.flush();
    const totalMs = performance.now() - started;
    const balancing = eplb ? eplbSummary(opened.runner) : undefined;
    if (!args.json) {
      process.stdout.write(tail + '\n');
      process.stderr.write(
        `${tokenIds.length} tokens in ${totalMs.toFixed(0)} ms (first after ${(firstTokenMs ?? 0).toFixed(0)} ms; ` +
          `${promptTokenIds.length} prompt tokens; finish: ${finishReason})\n`,
      );
      if (balancing)
        process.stderr.write(
          `eplb: ${balancing.steps} steps, ${balancing.decisions} decisions, ${balancing.applied} applied` +
            (balancing.last
              ? `; last at step ${balancing.last.step}: imbalance ${balancing.last.imbalanceBefore.toFixed(2)} -> ` +
                `${balancing.last.imbalanceAfter.toFixed(2)}${balancing.last.applied ? '' : ' (kept the placement)'}`
              : ` (a decision needs ${eplb!.windowSteps} steps in the window; --eplb-window, --eplb-period)`) +
            '\n',
        );
      return 0;
    }
    const decodeMs = totalMs - (firstTokenMs ?? totalMs);
    console.log(
      JSON.stringify({
        model: args.model,
        device: opened.device,
        layout: opened.layout,
        prompt: text,
        promptTokenIds,
        tokenIds,
        text: tok.decode(tokenIds),
        finishReason,
        ...(balancing ? { eplb: balancing } : {}),
        timings: {
          loadMs: +loadMs.toFixed(1),
          firstTokenMs: firstTokenMs === undefined ? null : +firstTokenMs.toFixed(1),
          decodeMs: +decodeMs.toFixed(1),
          decodeTokensPerSecond: tokenIds.length > 1 ? +(((tokenIds.length - 1) * 1000) / decodeMs).toFixed(1) : null,
        },
      }),
    );
    return 0;
  } finally {
    await opened.dispose();
  }
}

/** The EPLB policy of --eplb and the --eplb-* options (any of which implies --eplb); undefined without them. */
function eplbOptions(args: GenerateArgs): EplbPolicy | undefined {
  const windowSteps = numberOption('eplb-window', args['eplb-window'], { integer: true, min: 1 });
  const periodSteps = numberOption('eplb-period', args['eplb-period'], { integer: true, min: 1 });
  const redundantSlotsPerRank = numberOption('eplb-redundant', args['eplb-redundant'], { integer: true, min: 0 });
  const minImbalanceGain = numberOption('eplb-min-gain', args['eplb-min-gain'], { max: 0.999999 });
  const given = [windowSteps, periodSteps, redundantSlotsPerRank, minImbalanceGain].some((v) => v !== undefined);
  if (!args.eplb && !given) return undefined;
  return {
    ...DEFAULT_EPLB_POLICY,
    ...(windowSteps !== undefined ? { windowSteps } : {}),
    ...(periodSteps !== undefined ? { periodSteps } : {}),
    ...(redundantSlotsPerRank !== undefined ? { redundantSlotsPerRank } : {}),
    ...(minImbalanceGain !== undefined ? { minImbalanceGain } : {}),
  };
}

/** What the runner's balancer did: steps seen, decisions taken and applied, and the last one. */
function eplbSummary(runner: unknown) {
  const balancer = (runner as { expertBalancer?: ExpertBalancer }).expertBalancer;
  if (!balancer) return undefined;
  const last = balancer.decisions.at(-1);
  return {
    policy: balancer.policy,
    steps: balancer.window.totalSteps,
    decisions: balancer.decisionCount,
    applied: balancer.appliedCount,
    last: last && {
      step: last.step,
      imbalanceBefore: last.imbalanceBefore,
      imbalanceAfter: last.imbalanceAfter,
      gain: last.gain,
      applied: last.applied,
    },
  };
}

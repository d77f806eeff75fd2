#!/usr/bin/env node
/**
 * The `tandem` command line.
 *
 *   tandem info [--json]   what this machine offers (CUDA, NCCL, UCX, cuBLAS, kernels) and why not
 *   tandem start           the embedded deployment on this machine (what `npm start` runs)
 *   tandem serve -f FILE   a deployment graph
 *   tandem generate ...    one request through the engine (see lib/cli/generate.ts)
 *   tandem --version
 */
import { parseArgs } from 'node:util';
import { capabilities } from '../capabilities/index.js';
import { BadArgumentError, TandemError } from '../errors.js';
import { packageVersion } from '../version.js';
import { formatCapabilities } from './format.js';
import { generate } from './generate.js';
import { start } from './start.js';

const HELP = `tandem ${packageVersion}: disaggregated LLM serving for Node.js

Usage:
  tandem info [--json]     report CUDA, NCCL, UCX, cuBLAS and kernel availability (and why not)
  tandem start [--mode disagg|agg] [--port N] [--host H] [--model M]
                           serve the embedded deployment: OpenAI API on 127.0.0.1:8000, one
                           prefill and one decode worker (CPU engine, dummy:tiny by default)
  tandem serve -f graph.yaml
                           serve a deployment graph (YAML; see README)
  tandem generate --model <dir|dummy:preset> --prompt TEXT [--max-tokens N] [--device cpu|cuda]
                  [--seed S] [--temperature T] [--top-p P] [--top-k K] [--chat] [--json]
                           generate text with the reference engine (greedy unless --temperature)
  tandem --version         print the version
  tandem --help            print this help

Environment: TANDEM_LIBCUDA, TANDEM_LIBNVML, TANDEM_LIBNCCL, TANDEM_LIBUCP, TANDEM_LIBCUBLAS,
TANDEM_LIBCUBLASLT (where to find each library), TANDEM_KERNELS (fatbin), TANDEM_ADDON (addon binary).`;

async function main(argv: string[]): Promise<number> {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: {
      json: { type: 'boolean', default: false },
      model: { type: 'string' },
      prompt: { type: 'string' },
      'max-tokens': { type: 'string' },
      device: { type: 'string' },
      seed: { type: 'string' },
      temperature: { type: 'string' },
      'top-p': { type: 'string' },
      'top-k': { type: 'string' },
      threads: { type: 'string' },
      chat: { type: 'boolean', default: false },
      file: { type: 'string', short: 'f' },
      mode: { type: 'string' },
      host: { type: 'string' },
      port: { type: 'string' },
      help: { type: 'boolean', short: 'h', default: false },
      version: { type: 'boolean', short: 'v', default: false },
    },
  });
  if (values.version) {
    console.log(packageVersion);
    return 0;
  }
  const command = positionals[0];
  if (values.help || !command) {
    console.log(HELP);
    return command || values.help ? 0 : 1;
  }
  switch (command) {
    case 'info': {
      const caps = await capabilities();
      console.log(values.json ? JSON.stringify(caps, null, 2) : formatCapabilities(caps));
      return 0;
    }
    case 'start':
      return start(values);
    case 'serve':
      if (!values.file) throw new BadArgumentError('tandem serve needs -f graph.yaml (or run tandem start)');
      return start(values);
    case 'generate':
      return generate(values);
    default:
      console.error(`tandem: unknown command '${command}'\n\n${HELP}`);
      return 2;
  }
}

main(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code;
  },
  (error: unknown) => {
    if (error instanceof TandemError || (error instanceof Error && error.name === 'TypeError' && 'code' in error)) {
      console.error(`tandem: ${(error as Error).message}`);
    } else {
      console.error('tandem:', error);
    }
    process.exitCode = 1;
  },
);

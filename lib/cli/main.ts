#!/usr/bin/env node
/**
 * The `tandem` command line.
 *
 *   tandem info [--json]   what this machine offers (CUDA, NCCL, UCX, cuBLAS, kernels) and why not
 *   tandem start           the embedded deployment on this machine (what `npm start` runs)
 *   tandem serve -f FILE   a deployment graph
 *   tandem generate ...    one request through the engine (see lib/cli/generate.ts)
 *   tandem bench serve ... goodput under SLOs (lib/bench/command.ts parses its options)
 *   tandem profile ...     a performance profile of a model on this machine (lib/cli/profile.ts)
 *   tandem plan ...        the replicas and layouts the planner would choose (lib/cli/plan.ts)
 *   tandem k8s render ...  Kubernetes manifests of a deployment graph (lib/cli/k8s.ts parses its options)
 *   tandem --version
 */
import { capabilities } from '../capabilities/index.js';
import { TandemError } from '../errors.js';
import { packageVersion } from '../version.js';
import { parseCommandLine, UsageError } from './args.js';
import { formatCapabilities } from './format.js';
import { generate } from './generate.js';
import { plan } from './plan.js';
import { profile } from './profile.js';
import { start } from './start.js';

const HELP = `tandem ${packageVersion}: disaggregated LLM serving for Node.js

Usage:
  tandem info [--json]     report CUDA, NCCL, UCX, cuBLAS and kernel availability (and why not)
  tandem start [--mode disagg|agg] [--port N] [--host H] [--model M] [--api-key KEY] [--seed S]
               [--router-policy kv|least-load|round-robin|random] [--migration-limit N]
                           serve the embedded deployment: OpenAI API on 127.0.0.1:8000, one
                           prefill and one decode worker (CPU engine, dummy:tiny by default)
  tandem serve -f graph.yaml [--port N] [--host H] [--api-key KEY] [--seed S] [--router-policy P]
               [--migration-limit N] [--control etcd://HOST:2379 [--namespace NS]]
                           serve a deployment graph (YAML; see README); --router-policy overrides
                           the graph's router.policy (default kv: by cached prefix and load);
                           --migration-limit: times a request whose worker dies is re-issued to
                           another (default 3, 0: never)
  tandem generate --model <dir|dummy:preset> --prompt TEXT [--max-tokens N] [--device cpu|cuda]
                  [--seed S] [--temperature T] [--top-p P] [--top-k K] [--threads N] [--tp N] [--pp N]
                  [--ep N] [--eplb] [--eplb-window N] [--eplb-period N] [--eplb-redundant N]
                  [--eplb-min-gain G] [--chat] [--json]
                           generate text with the reference engine (greedy unless --temperature);
                           --tp / --pp / --ep: tensor / pipeline / expert parallel ranks (CPU engine;
                           --tp also on the GPU engine, every rank on one GPU)
                           --eplb: balance the experts over the ep ranks online (--eplb-*: its window
                           and period in steps, redundant slots per rank, least imbalance gain)
  tandem bench serve [--quick] [--url URL | --deploy A.yaml,B.yaml] [--rate R,... | --concurrency C,...]
                           goodput under SLOs of a deployment or of any OpenAI-compatible server
                           (tandem bench serve --help lists its options)
  tandem profile --model <dir|dummy:preset> --out FILE [--quick] [--isl N,...] [--batch N,...]
                 [--context N,...] [--tp N,...] [--pp N,...] [--ep N,...] [--device cpu|cuda|auto]
                 [--threads N] [--seed S]
                           measure prefill time against input length and decode step time against
                           batch and context through the engine, for each parallel layout of the sizes
                           listed; write the profile (JSON), a table and a chart (FILE.svg)
  tandem plan --profile FILE --isl N --osl N --rate R --ttft-ms T --itl-ms I --gpus G [--json]
                           the prefill and decode replicas and layouts that meet the SLAs within G GPUs
                           (exit status 1 when G is not enough: the best effort is printed)
  tandem k8s render -f graph.yaml [--out DIR] [--image IMAGE] [--namespace NS] [--etcd etcd://H:P]
                           write the Kubernetes manifests of a deployment graph
                           (tandem k8s --help lists its options)
  tandem worker --join etcd://HOST:2379 --pool NAME --graph FILE [--host ADDR] [--advertise ADDR]
                [--port N] [--kv-port N] [--status-port N] [--name NAME] [--namespace NS]
                [--kv-backend auto|tcp|ucx|shm] [--drain-timeout SECONDS]
                           one worker of the graph's pool NAME on this host, registered in etcd,
                           reached by frontends over TCP on ADDR (default 127.0.0.1; beyond loopback
                           TANDEM_TOKEN must be set); --status-port: /live and /health over HTTP;
                           on SIGTERM it drains (default 30 s; a second signal stops it at once)
  tandem frontend --join etcd://HOST:2379 --graph FILE [--host ADDR] [--port N] [--namespace NS]
                           the OpenAI API in front of the workers registered in etcd
  tandem --version         print the version
  tandem --help            print this help

Exit status: 0 done, 1 failed, 2 wrong command line.

Environment: TANDEM_API_KEY (the API key of tandem start/serve, instead of --api-key), TANDEM_TOKEN (the
shared token of the request plane between frontends and workers), TANDEM_LIBCUDA,
TANDEM_LIBNVML, TANDEM_LIBNCCL, TANDEM_LIBUCP, TANDEM_LIBCUBLAS, TANDEM_LIBCUBLASLT (where to find each
library), TANDEM_KERNELS (fatbin), TANDEM_ADDON (addon binary).`;

async function main(argv: string[]): Promise<number> {
  // bench serve has options of its own, parsed where the benchmark is (loaded only for it).
  if (argv[0] === 'bench') {
    if (argv[1] !== 'serve')
      throw new UsageError(
        `bench needs serve (got ${argv[1] === undefined ? 'nothing' : `'${argv[1]}'`}) (see tandem --help)`,
      );
    const { benchServeMain } = await import('../bench/command.js');
    return benchServeMain(argv.slice(2));
  }
  if (argv[0] === 'k8s') {
    const { k8sMain } = await import('./k8s.js');
    return k8sMain(argv.slice(1));
  }
  const { command, values } = parseCommandLine(argv);
  if (values.version) {
    console.log(packageVersion);
    return 0;
  }
  if (values.help || !command) {
    console.log(HELP);
    return command || values.help ? 0 : 2;
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
      if (!values.file) throw new UsageError('tandem serve needs -f graph.yaml (or run tandem start)');
      return start(values);
    case 'generate':
      return generate(values);
    case 'profile':
      return profile(values);
    case 'plan':
      return plan(values);
    case 'worker': {
      const { worker } = await import('./worker.js');
      return worker(values);
    }
    case 'frontend': {
      const { frontend } = await import('./frontend.js');
      return frontend(values);
    }
  }
}

main(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code;
  },
  (error: unknown) => {
    // Expected failures (a wrong command line, a missing model, a busy port) are one line; anything else is a
    // bug, printed whole.
    if (error instanceof TandemError) console.error(`tandem: ${error.message}`);
    else console.error('tandem:', error);
    process.exitCode = error instanceof UsageError ? 2 : 1;
  },
);

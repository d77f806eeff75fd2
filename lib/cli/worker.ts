/**
 * `tandem worker --join etcd://HOST:2379 --pool NAME --graph FILE [--host ADDR] [--port N]`: one worker of the
 * graph's pool NAME on this host, registered in etcd, serving frontends over TCP (lib/worker/worker-join.ts).
 * Runs until SIGINT or SIGTERM, then drains (up to --drain-timeout, default 30 s; a second signal cuts it short),
 * leaves discovery and stops. In a pod, TANDEM_POD_NAME, TANDEM_POD_IP and
 * TANDEM_CONTROL_NAMESPACE stand in for --name, --advertise and --namespace.
 */
import { loadGraph } from '../deploy/graph.js';
import { joinWorker } from '../worker/worker-join.js';
import { choiceOption, numberOption, UsageError } from './args.js';
import { watchSignals } from './signals.js';

export interface WorkerArgs {
  join?: string;
  pool?: string;
  graph?: string;
  host?: string;
  advertise?: string;
  port?: string;
  'kv-port'?: string;
  'status-port'?: string;
  name?: string;
  namespace?: string;
  seed?: string;
  'kv-backend'?: string;
  'drain-timeout'?: string;
}

export async function worker(args: WorkerArgs): Promise<number> {
  if (!args.join) throw new UsageError('tandem worker needs --join etcd://HOST:2379');
  if (!args.pool) throw new UsageError('tandem worker needs --pool NAME (a pool of the graph)');
  if (!args.graph) throw new UsageError('tandem worker needs --graph FILE');
  if (args.host === '') throw new UsageError('--host must not be empty');
  const port = numberOption('port', args.port, { integer: true, min: 0, max: 65535 });
  const kvPort = numberOption('kv-port', args['kv-port'], { integer: true, min: 0, max: 65535 });
  const statusPort = numberOption('status-port', args['status-port'], { integer: true, min: 0, max: 65535 });
  // In a pod (tandem k8s render), its name and the deployment's etcd namespace come from the environment.
  const name = args.name ?? (process.env.TANDEM_POD_NAME || undefined);
  const namespace = args.namespace ?? (process.env.TANDEM_CONTROL_NAMESPACE || undefined);
  const seed = numberOption('seed', args.seed, { integer: true }) ?? 0;
  const drainTimeoutS = numberOption('drain-timeout', args['drain-timeout'], { min: 0 });
  const kvBackend = choiceOption('kv-backend', args['kv-backend'], ['auto', 'shm', 'tcp', 'ucx'] as const);
  // Watched from here: a signal during the model load or the registration stops the worker once it is up.
  const signals = watchSignals();
  try {
    const joined = await joinWorker({
      graph: loadGraph(args.graph),
      pool: args.pool,
      control: args.join,
      ...(namespace ? { controlOptions: { namespace } } : {}),
      ...(args.host ? { host: args.host } : {}),
      ...(args.advertise ? { advertise: args.advertise } : {}),
      ...(port !== undefined ? { port } : {}),
      ...(kvPort !== undefined ? { kvPort } : {}),
      ...(statusPort !== undefined ? { statusPort } : {}),
      ...(name ? { name } : {}),
      ...(kvBackend && kvBackend !== 'auto' ? { kvBackend } : {}),
      ...(drainTimeoutS !== undefined ? { drainTimeoutMs: drainTimeoutS * 1000 } : {}),
      seed,
    });
    // The first signal drains (frontends choose this worker no more; its requests in flight finish, up to the drain
    // timeout); a second one, or the timeout, stops it at once: requests still running migrate to other workers.
    const signal = await signals.next();
    console.log(
      `tandem: ${signal}: ${joined.name} drains ${joined.inFlight()} request(s) in flight (a second signal stops it at once)`,
    );
    const drained = await Promise.race([joined.drain(), signals.next().then(() => false)]);
    console.log(
      `tandem: ${joined.name} ${drained ? 'drained' : `stops with ${joined.inFlight()} request(s) in flight (they migrate)`}; ` +
        'it leaves discovery and stops',
    );
    await joined.stop();
  } finally {
    signals.close();
  }
  return 0;
}

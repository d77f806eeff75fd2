/**
 * A "host" in its own process: connects to etcd, registers one worker and keeps its lease alive until killed.
 * argv: endpoint namespace workerName ttlSeconds. Prints `registered` once the worker is in etcd. Exits by
 * itself after 60 s so that a test that dies first leaves nothing behind.
 */
import { EtcdControlPlane } from '../../lib/control/index.js';
import { workerRegistration } from './registration.js';

const [endpoint, namespace, name, ttl] = process.argv.slice(2);
const plane = await EtcdControlPlane.connect({
  endpoints: endpoint!,
  namespace: namespace!,
  leaseTtlSeconds: Number(ttl),
});
await plane.register(workerRegistration(name!, 'prefill'));
process.stdout.write('registered\n');
setTimeout(() => process.exit(0), 60_000);

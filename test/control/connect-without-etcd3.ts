/**
 * EtcdControlPlane.connect in a process where the optional etcd3 package does not resolve (a module hook hides
 * it): prints the error it rejects with as JSON.
 */
import { register } from 'node:module';

const hideEtcd3 = `export async function resolve(specifier, context, next) {
  if (specifier === 'etcd3') throw Object.assign(new Error("Cannot find package 'etcd3'"), { code: 'ERR_MODULE_NOT_FOUND' });
  return next(specifier, context);
}`;
register(`data:text/javascript,${encodeURIComponent(hideEtcd3)}`);
const { EtcdControlPlane } = await import('../../lib/control/index.js');
try {
  await EtcdControlPlane.connect({ endpoints: '127.0.0.1:2379' });
  console.log(JSON.stringify({ connected: true }));
} catch (error) {
  const e = error as Error & { code?: string };
  console.log(JSON.stringify({ name: e.name, code: e.code, message: e.message }));
}

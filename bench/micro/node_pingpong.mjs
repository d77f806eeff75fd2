// The floor under a notification between two Node processes on one host: a plain Node ping-pong over a
// unix socket (no Tandem), one byte each way, 5000 round trips after 500 of warm-up. Prints half the round
// trip (one way: a write, the peer's event loop woken, its handler, and back), p50 and p99, in us.
// Compare with bench:transfer's "notification alone, one way".
//   node bench/micro/node_pingpong.mjs
import { fork } from 'node:child_process';
import { rmSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const path = join(tmpdir(), `tandem-pingpong-${process.pid}.sock`);

if (process.argv[2] === 'echo') {
  const server = net.createServer((s) => {
    s.setNoDelay(true);
    s.on('data', (d) => s.write(d));
    s.on('end', () => process.exit(0));
  });
  server.listen(process.argv[3], () => process.send('ready'));
} else {
  rmSync(path, { force: true });
  const child = fork(new URL(import.meta.url).pathname, ['echo', path]);
  await new Promise((resolve) => child.once('message', resolve));
  const sock = net.connect(path);
  await new Promise((resolve) => sock.once('connect', resolve));
  const one = Buffer.from([1]);
  const times = [];
  let pending;
  sock.on('data', () => pending());
  for (let i = 0; i < 5500; i++) {
    const t0 = process.hrtime.bigint();
    await new Promise((resolve) => {
      pending = resolve;
      sock.write(one);
    });
    if (i >= 500) times.push(Number(process.hrtime.bigint() - t0) / 2e3);
  }
  times.sort((a, b) => a - b);
  const pct = (p) => times[Math.min(times.length - 1, Math.floor((p / 100) * times.length))].toFixed(1);
  console.log(
    `node unix-socket ping-pong, one way (round trip / 2, ${times.length}): p50 ${pct(50)} us, p99 ${pct(99)} us`,
  );
  sock.end();
  rmSync(path, { force: true });
}

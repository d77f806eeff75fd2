import { readdirSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { NotRegisteredError, TransferAgent } from '../lib/index.js';

// Registration churn: an engine registers and drops regions all day. 10,000 cycles must leave nothing
// behind (no file descriptors, no regions in the metadata, bounded memory) and must not get slower
// as they go (a leak in a map or a list shows up as later cycles taking longer than earlier ones).
const openFds = () => readdirSync('/proc/self/fd').length;

describe('register/deregister churn', () => {
  it('10,000 shared and plain-host cycles leak no descriptors or regions and do not slow down', async () => {
    const agent = await TransferAgent.create({ name: 'churn' });
    try {
      const emptyMetadata = agent.metadata().length;
      const host = Buffer.alloc(64 << 10);
      const fdsBefore = openFds();
      const rssBefore = process.memoryUsage().rss;
      const batchMs: number[] = [];
      for (let batch = 0; batch < 10; batch++) {
        const t0 = performance.now();
        for (let i = 0; i < 500; i++) {
          const shared = agent.allocShared(64 << 10);
          shared.view![0] = i & 0xff; // the mapping is real
          agent.deregister(shared);
          agent.deregister(agent.registerHost(host));
        }
        batchMs.push(performance.now() - t0);
      }
      expect(openFds()).toBe(fdsBefore);
      expect(agent.metadata().length).toBe(emptyMetadata);
      // 10,000 x 64 KiB mappings went through: a leak of mappings alone would be ~640 MiB.
      expect(process.memoryUsage().rss - rssBefore).toBeLessThan(64 << 20);
      // Later batches are not slower than the early ones (generous bound: this is a leak check, not a speed test).
      const early = Math.min(...batchMs.slice(0, 3));
      const late = Math.min(...batchMs.slice(-3));
      expect(late).toBeLessThan(early * 4 + 20);
      // A deregistered region is gone for good.
      const r = agent.allocShared(4096);
      agent.deregister(r);
      expect(() => agent.deregister(r)).toThrow(NotRegisteredError);
    } finally {
      await agent.dispose();
    }
  });
});

"""PyTorch half of `npm run bench:collectives`: one rank of torch.distributed (NCCL backend).

bench/collectives.ts spawns one of these per GPU with the same plan its own ranks ran, and reads rank 0's
measurements from the line that starts with TANDEM_ROWS. The method mirrors bench/collectives.ts exactly:
warm-up; bandwidth = median over `reps` of (elapsed for `iters` back-to-back operations, then one
torch.cuda.synchronize()) / iters; latency = median over `latencyIters` of (one operation, then
torch.cuda.synchronize()).
"""

import argparse
import json
import time

import torch
import torch.distributed as dist


def bus_factor(op: str, n: int) -> float:
    if op == "allReduce":
        return 2 * (n - 1) / n
    if op in ("allGather", "reduceScatter", "allToAll"):
        return (n - 1) / n
    return 1.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--plan", required=True)
    args = parser.parse_args()
    plan = json.loads(args.plan)
    rank, n = args.rank, args.world

    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    dist.init_process_group(
        "nccl", init_method=f"tcp://127.0.0.1:{args.port}", rank=rank, world_size=n, device_id=device
    )
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[plan["dtype"]]
    elem = torch.tensor([], dtype=dtype).element_size()
    max_bytes = max(e["bytes"] for e in plan["entries"])
    send = torch.zeros(max_bytes // elem, dtype=dtype, device=device)
    recv = torch.zeros(max_bytes // elem, dtype=dtype, device=device)
    tiny = torch.zeros(2, dtype=torch.float32, device=device)
    nxt, prv = (rank + 1) % n, (rank - 1 + n) % n

    def barrier() -> None:
        dist.all_reduce(tiny)
        torch.cuda.synchronize()

    def make(op: str, nbytes: int):
        count = nbytes // elem
        s, r = send[:count], recv[:count]
        part_in, part_out = send[: count // n], recv[: count // n]
        if op == "allReduce":
            return lambda: dist.all_reduce(s)
        if op == "allGather":
            return lambda: dist.all_gather_into_tensor(r, part_in)
        if op == "reduceScatter":
            return lambda: dist.reduce_scatter_tensor(part_out, s)
        if op == "broadcast":
            return lambda: dist.broadcast(s, src=0)
        if op == "reduce":
            return lambda: dist.reduce(s, dst=0)
        if op == "allToAll":
            return lambda: dist.all_to_all_single(r, s)
        if op == "sendRecv":

            def ring() -> None:
                works = dist.batch_isend_irecv([dist.P2POp(dist.isend, s, nxt), dist.P2POp(dist.irecv, r, prv)])
                for w in works:
                    w.wait()

            return ring
        raise ValueError(f"unknown op {op}")

    rows = []
    for e in plan["entries"]:
        run = make(e["op"], e["bytes"])
        for _ in range(e["warmup"]):
            run()
        torch.cuda.synchronize()
        per_op = []
        for _ in range(e["reps"]):
            barrier()
            t0 = time.perf_counter()
            for _ in range(e["iters"]):
                run()
            torch.cuda.synchronize()
            per_op.append((time.perf_counter() - t0) * 1e6 / e["iters"])
        time_us = sorted(per_op)[len(per_op) // 2]  # the same median as bench/collectives.ts
        algbw = e["bytes"] / (time_us * 1e3)
        row = {
            "op": e["op"],
            "bytes": e["bytes"],
            "timeUs": time_us,
            "algbwGBps": algbw,
            "busbwGBps": algbw * bus_factor(e["op"], n),
        }
        if e["latencyIters"] > 0:
            barrier()
            lat = []
            for _ in range(e["latencyIters"]):
                t0 = time.perf_counter()
                run()
                torch.cuda.synchronize()
                lat.append((time.perf_counter() - t0) * 1e6)
            lat.sort()
            row["latencyUs"] = lat[len(lat) // 2]
        rows.append(row)

    barrier()
    dist.destroy_process_group()
    if rank == 0:
        print("TANDEM_ROWS " + json.dumps(rows), flush=True)


if __name__ == "__main__":
    main()

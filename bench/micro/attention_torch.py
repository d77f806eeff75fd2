#!/usr/bin/env python3
"""PyTorch's causal prefill attention, backend by backend, on the shape bench/micro/attention.cu times Tandem's
kernels at: one layer of Llama-3.1-8B's attention (32 q heads, 8 kv heads, head dim 128, bf16), one prompt of T
tokens. Issue 22 asks whether cuDNN's fused attention (dlopened, with our kernel as the fallback) would measure
faster than our flash prefill kernel; this gives cuDNN's time, and flash-attention's and the memory-efficient
kernel's, to set against attention.cu's prefill3 column from the same GPU.

    python3 bench/micro/attention_torch.py [--tokens 512,3000,8192] [--repeats 20] [--json FILE]

Each backend through torch.nn.attention.sdpa_kernel (FLASH_ATTENTION, CUDNN_ATTENTION, EFFICIENT_ATTENTION),
scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True) on contiguous (1, heads, T, 128) tensors
(Tandem's kernels read K and V from 16-token blocks of the paged pool instead; a backend without GQA gets K and V
repeated per q head, and its row says so); 3 untimed runs, then `repeats`
runs each between two CUDA events, the median. TFLOP/s counts causal attention's FLOPs, 4 x heads x 128 x
T(T+1)/2 (the same count bench:engine and attention.cu use). Each backend's output is checked against a float32
softmax(QK^T)V on 4 sampled q heads: the relative L2 error, which must stay under 2e-2 (attention.cu's bound).
A backend this GPU or this torch does not support becomes a row that says why.

Prints a table, and with --json writes the rows. Exit 2 (one line on stderr) without torch or a CUDA GPU, or on
bad arguments; exit 1 if a backend that ran is outside the error bound.
"""
import argparse
import json
import statistics
import sys

H, KVH, D = 32, 8, 128
BOUND = 2e-2


def fail(message, code=2):
    print(f"attention_torch: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def positive_ints(text):
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of token counts, got {text!r}")
    if not values or any(v < 1 or v > 131072 for v in values):
        raise argparse.ArgumentTypeError(f"token counts must be 1 to 131072, got {text!r}")
    return values


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="attention_torch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=positive_ints, default=[512, 3000, 8192])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if not 1 <= args.repeats <= 1000:
        parser.error(f"--repeats must be 1 to 1000, got {args.repeats}")
    return args


def main(argv):
    args = parse_args(argv)
    try:
        import torch
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except Exception as e:  # noqa: BLE001 - any import failure means the same to the caller
        fail(f"cannot import torch: {type(e).__name__}: {e}")
    if not torch.cuda.is_available():
        fail("no CUDA GPU visible to torch")
    dev = torch.device("cuda", 0)
    backends = [("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                ("efficient", SDPBackend.EFFICIENT_ATTENTION)]
    gen = torch.Generator(device=dev).manual_seed(1)
    rows = []
    print(f"{torch.cuda.get_device_name(dev)}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}; "
          f"one layer: {H} q heads, {KVH} kv heads, head dim {D}, bf16, causal; median of {args.repeats}")
    print(f"{'tokens':>7} {'backend':>10} {'ms':>9} {'TFLOP/s':>8} {'rel err':>9}  note")
    failed = False
    for t in args.tokens:
        q = torch.randn(1, H, t, D, device=dev, dtype=torch.bfloat16, generator=gen)
        k = torch.randn(1, KVH, t, D, device=dev, dtype=torch.bfloat16, generator=gen)
        v = torch.randn(1, KVH, t, D, device=dev, dtype=torch.bfloat16, generator=gen)
        # The reference: 4 q heads (of different kv heads) in float32, causal softmax(QK^T / sqrt(D)) V.
        heads = [0, 9, 18, 31]
        mask = torch.ones(t, t, device=dev, dtype=torch.bool).tril()
        ref = []
        for h in heads:
            qh, kh, vh = q[0, h].float(), k[0, h // (H // KVH)].float(), v[0, h // (H // KVH)].float()
            s = (qh @ kh.T) / D**0.5
            ref.append(torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1) @ vh)
        del mask
        flops = 4 * H * D * t * (t + 1) / 2
        for name, backend in backends:
            row = {"tokens": t, "backend": name}
            try:
                with sdpa_kernel(backend):
                    run = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # noqa: E731
                    try:
                        out = run()
                    except RuntimeError:
                        # A backend without GQA: K and V repeated per q head (more bytes read, the same FLOPs).
                        ke, ve = k.repeat_interleave(H // KVH, dim=1), v.repeat_interleave(H // KVH, dim=1)
                        run = lambda: F.scaled_dot_product_attention(q, ke, ve, is_causal=True)  # noqa: E731
                        out = run()
                        row["kvExpanded"] = True
                    for _ in range(2):
                        run()
                    times = []
                    for _ in range(args.repeats):
                        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        a.record()
                        run()
                        b.record()
                        b.synchronize()
                        times.append(a.elapsed_time(b))
                err = max(((out[0, h].float() - r).norm() / r.norm()).item() for h, r in zip(heads, ref))
                ms = statistics.median(times)
                row.update(ms=ms, tflops=flops / (ms * 1e9), relErr=err)
                ok = err < BOUND
                failed |= not ok
                note = ("" if ok else f"FAILED: over {BOUND:g}") + (" (K, V repeated per q head)" if row.get("kvExpanded") else "")
                print(f"{t:>7} {name:>10} {ms:>9.3f} {row['tflops']:>8.1f} {err:>9.2e}  {note}")
            except Exception as e:  # noqa: BLE001 - an unsupported backend is a row, not the end of the run
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
                print(f"{t:>7} {name:>10} {'-':>9} {'-':>8} {'-':>9}  unavailable: {row['error']}")
            rows.append(row)
        del q, k, v, ref
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(dev), "torch": torch.__version__,
                       "cudnn": torch.backends.cudnn.version(), "shape": {"heads": H, "kvHeads": KVH, "headDim": D},
                       "repeats": args.repeats, "rows": rows}, f, indent=2)
        print(f"wrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
